# The default pipeline on the embedded demo (KJV corpus, 4M-parameter Llama teacher).
# Run:  make pipeline                       (this file is the default PIPELINE)
#       make pipeline PIPELINE=pipelines/<name>.mk   (another configuration)
# Every stage is a file target under $(RUN): an interrupted run picks up where it stopped,
# and `make <stage>` (init, generate, filter, augment, distill, baseline, chain, finetune,
# eval, report) re-runs one stage. `<STAGE>_CMD=...` swaps in another program that keeps
# ../shared/CONTRACT.md (it receives the same flags; see README).

RUN        ?= runs/default
TEACHER    ?= data/demo-teacher
CORPUS     ?= data/kjv
DEVICE     ?= cpu
DTYPE      ?= auto
SEED       ?= 0
# Sizes and budgets (2 CPU cores: about 6 minutes in all).
STUDENT_SHAPE ?= --layers 2 --hidden 128 --heads 2 --kv-heads 1 --intermediate 352
TA_SIZES   ?= layers=3,hidden=192,heads=2,kv-heads=1,intermediate=512;layers=2,hidden=128,heads=2,kv-heads=1,intermediate=352
INIT       ?= prune
PROMPTS_N  ?= 512
CORPUS_N   ?= 2000
CALIB_N    ?= 64
GEN_TOKENS ?= 48
STEPS      ?= 400
CHAIN_STEPS ?= 250
FT_STEPS   ?= 100
BATCH      ?= 16
SEQ_LEN    ?= 160
LR         ?= 2e-3
FT_LR      ?= 2e-4
KD_FLAGS   ?= --alpha 0.5 --beta 0.5 --temperature 2 --divergence forward-kl
EVAL_N     ?= 200
HELDOUT_N  ?= 1000
EVAL_TASKS ?= --mc $(RUN)/data/eval_mc.jsonl --cloze $(RUN)/data/eval_cloze.jsonl --generate $(RUN)/data/gen.jsonl --limit $(EVAL_N) --speed

INIT_CMD     ?= $(BIN)/kd-init
GENERATE_CMD ?= $(BIN)/kd-generate
FILTER_CMD   ?= $(BIN)/kd-filter
AUGMENT_CMD  ?= $(BIN)/kd-augment
DISTILL_CMD  ?= $(BIN)/kd-distill
CHAIN_CMD    ?= $(BIN)/kd-chain
FINETUNE_CMD ?= $(BIN)/kd-finetune
EVAL_CMD     ?= $(BIN)/kd-eval
REPORT_CMD   ?= $(BIN)/kd-report

COMMON = --device $(DEVICE)
# The built-in long stages continue an interrupted run from their journal (--resume starts
# afresh when there is none); a swapped-in program is not given the flag.
resume_if = $(if $(filter $(BIN)/$(1),$(2)),--resume)
D = $(RUN)/data
# Every stage appends its exact command line to the log the report's card is built from.
export KD_COMMAND_LOG := $(abspath $(RUN))/commands.jsonl

.PHONY: pipeline data init generate filter augment distill baseline chain finetune eval report

pipeline: build $(RUN)/report/report.md
	@echo "pipeline done: $(RUN)/report/report.md"

# Unpacked, size-limited copies of the embedded corpus.
$(D)/.ready: $(wildcard $(CORPUS)/*.jsonl.gz)
	mkdir -p $(D)
	zcat $(CORPUS)/train.jsonl.gz | head -n $(CORPUS_N) > $(D)/corpus.jsonl
	zcat $(CORPUS)/train.jsonl.gz | head -n $(CALIB_N) > $(D)/calib.jsonl
	zcat $(CORPUS)/prompts.jsonl.gz | awk 'NR % 7 == 3' | head -n $(PROMPTS_N) > $(D)/prompts.jsonl
	zcat $(CORPUS)/heldout.jsonl.gz | head -n $(HELDOUT_N) > $(D)/heldout.jsonl
	zcat $(CORPUS)/eval_mc.jsonl.gz > $(D)/eval_mc.jsonl
	zcat $(CORPUS)/eval_cloze.jsonl.gz > $(D)/eval_cloze.jsonl
	zcat $(CORPUS)/task.jsonl.gz | head -n 400 > $(D)/task.jsonl
	zcat $(CORPUS)/task.jsonl.gz | tail -n 50 > $(D)/gen.jsonl
	$(PYTHON) scripts/environment.py > $(D)/environment.json
	touch $@
data: $(D)/.ready

$(RUN)/student-init/model.safetensors: $(D)/.ready
	$(INIT_CMD) --teacher $(TEACHER) --out $(RUN)/student-init --init $(INIT) $(STUDENT_SHAPE) --calib $(D)/calib.jsonl --seed $(SEED) $(COMMON)
init: $(RUN)/student-init/model.safetensors

$(RUN)/transfer.jsonl: $(D)/.ready
	$(GENERATE_CMD) --teacher $(TEACHER) --prompts $(D)/prompts.jsonl --out $@ --max-new-tokens $(GEN_TOKENS) --temperature 1.0 --top-p 0.95 --seed $(SEED) --batch-size 32 $(COMMON) $(call resume_if,kd-generate,$(GENERATE_CMD))
generate: $(RUN)/transfer.jsonl

# 70% most confident plus 30% hardest for the initial student, near-duplicates removed.
$(RUN)/filtered.jsonl: $(RUN)/transfer.jsonl $(RUN)/student-init/model.safetensors
	$(FILTER_CMD) --teacher $(TEACHER) --student $(RUN)/student-init --data $(RUN)/transfer.jsonl --out $@ --dedup near --select teacher_confidence:top:0.7 --select kl_teacher_student:top:0.3 --min-tokens 8 $(COMMON) $(call resume_if,kd-filter,$(FILTER_CMD))
filter: $(RUN)/filtered.jsonl

$(RUN)/augmented.jsonl: $(RUN)/filtered.jsonl
	$(AUGMENT_CMD) --data $(RUN)/filtered.jsonl --out $@ --ops delete,swap --fraction 0.25 --ratio 0.1 --seed $(SEED)
augment: $(RUN)/augmented.jsonl

# Transfer set plus corpus passages: the training data of the student and the baseline.
$(RUN)/train.jsonl: $(RUN)/augmented.jsonl $(D)/.ready
	cat $(RUN)/augmented.jsonl $(D)/corpus.jsonl > $@.tmp && mv $@.tmp $@

TRAIN_FLAGS = --data $(RUN)/train.jsonl --steps $(STEPS) --batch-size $(BATCH) --seq-len $(SEQ_LEN) --lr $(LR) --warmup 20 --eval-data $(D)/heldout.jsonl --eval-every 100 --save-every 100 --seed $(SEED) --dtype $(DTYPE) $(COMMON) --resume

$(RUN)/distilled/model.safetensors: $(RUN)/train.jsonl $(RUN)/student-init/model.safetensors
	$(DISTILL_CMD) --teacher $(TEACHER) --student $(RUN)/student-init --out $(RUN)/distilled $(KD_FLAGS) $(TRAIN_FLAGS)
distill: $(RUN)/distilled/model.safetensors

# The CE-only baseline: same student, data and steps, no teacher.
$(RUN)/baseline/model.safetensors: $(RUN)/train.jsonl $(RUN)/student-init/model.safetensors
	$(DISTILL_CMD) --student $(RUN)/student-init --out $(RUN)/baseline --alpha 1 --beta 0 $(TRAIN_FLAGS)
baseline: $(RUN)/baseline/model.safetensors

$(RUN)/chain/chain.json: $(RUN)/train.jsonl
	$(CHAIN_CMD) --teacher $(TEACHER) --sizes "$(TA_SIZES)" --data $(RUN)/train.jsonl --out $(RUN)/chain --steps $(CHAIN_STEPS) --init $(INIT) --calib $(D)/calib.jsonl --seed $(SEED) $(COMMON) --distill-args "$(KD_FLAGS) --batch-size $(BATCH) --seq-len $(SEQ_LEN) --lr $(LR) --warmup 20"
chain: $(RUN)/chain/chain.json

$(RUN)/finetuned/model.safetensors: $(RUN)/distilled/model.safetensors
	$(FINETUNE_CMD) --model $(RUN)/distilled --data $(D)/task.jsonl --out $(RUN)/finetuned --steps $(FT_STEPS) --lr $(FT_LR) --batch-size $(BATCH) --seq-len $(SEQ_LEN) --seed $(SEED) $(COMMON) --resume
finetune: $(RUN)/finetuned/model.safetensors

EVAL_ARGS = --teacher $(TEACHER) --data $(D)/heldout.jsonl $(EVAL_TASKS) --csv $(RUN)/eval/all.csv $(COMMON) $(call resume_if,kd-eval,$(EVAL_CMD))
$(RUN)/eval/teacher.json: $(D)/.ready
	mkdir -p $(RUN)/eval
	$(EVAL_CMD) --model $(TEACHER) --name teacher --strategy teacher --out $@ $(EVAL_ARGS)
$(RUN)/eval/distilled.json: $(RUN)/distilled/model.safetensors
	$(EVAL_CMD) --model $(RUN)/distilled --name distilled --strategy kd --out $@ $(EVAL_ARGS) --samples-out $(RUN)/eval/samples.md
$(RUN)/eval/baseline.json: $(RUN)/baseline/model.safetensors
	$(EVAL_CMD) --model $(RUN)/baseline --name ce-baseline --strategy ce --out $@ $(EVAL_ARGS)
$(RUN)/eval/student-init.json: $(RUN)/student-init/model.safetensors
	$(EVAL_CMD) --model $(RUN)/student-init --name pruned-init --strategy init --out $@ $(EVAL_ARGS)
$(RUN)/eval/chain.json: $(RUN)/chain/chain.json
	$(EVAL_CMD) --model $(RUN)/chain/hop1/model --name TA1 --strategy chain --out $(RUN)/eval/ta1.json $(EVAL_ARGS)
	$(EVAL_CMD) --model $(RUN)/chain/hop2/model --name chain-student --strategy chain --out $@ $(EVAL_ARGS)
$(RUN)/eval/finetuned.json: $(RUN)/finetuned/model.safetensors
	$(EVAL_CMD) --model $(RUN)/finetuned --name finetuned --strategy kd+finetune --out $@ $(EVAL_ARGS)
EVALS = $(addprefix $(RUN)/eval/,teacher.json student-init.json distilled.json baseline.json chain.json finetuned.json)
eval: $(EVALS)

$(RUN)/report/report.md: $(EVALS)
	$(REPORT_CMD) --metrics $(EVALS) $(RUN)/eval/ta1.json --out $(RUN)/report --student distilled --baseline ce-baseline --commands $(KD_COMMAND_LOG) --environment $(D)/environment.json --html --title "Distillery demo: KJV, 4M-parameter teacher"
report: $(RUN)/report/report.md
