# The size-versus-quality sweep on the embedded demo: students at three sizes (about 2x, 4x
# and 8x smaller than the teacher, by pruning) times strategies, each at two seeds, with the
# same data and steps for every model of a size; then curves with seed spread, paired
# verdicts against CE-only training, and a reproducibility card.
# Run:  make sweep                      (this file through `make pipeline PIPELINE=...`)
#       make sweep RUN=runs/sweep2 SEEDS="0 1 2" STEPS=400   (any variable below)
# Strategies: ce (CE only), kd (logits KD), kd-cos (KD plus hidden cosine matching), and
# chain (teacher -> TA at the middle size -> the smallest size, kd-chain), and, when asked
# (STRATEGIES="ce kd kd-cos on"), on: GKD's mix, half the micro-batches on the student's own
# samples scored with JSD(0.5), trained on the transfer set's prompts (on-policy batches need
# prompts, so the corpus passages are left out for it).
# Budget on 2 CPU cores: at most 45 minutes (docs/RESULTS.md has the measured figure).
#
# Larger configuration, for a GPU and a real teacher (same targets; the shapes must fit the
# teacher's, here Qwen3-1.7B: 28 layers, hidden 2048, 16 heads / 8 KV heads, FFN 6144):
#   make sweep RUN=runs/sweep-qwen TEACHER=Qwen/Qwen3-1.7B DEVICE=cuda DTYPE=bf16 \
#     SHAPE_2x="--layers 20 --hidden 1536 --heads 12 --kv-heads 4 --intermediate 4608" \
#     SHAPE_4x="--layers 14 --hidden 1024 --heads 8 --kv-heads 4 --intermediate 3072" \
#     SHAPE_8x="--layers 10 --hidden 768 --heads 6 --kv-heads 2 --intermediate 2048" \
#     CORPUS_N=100000 PROMPTS_N=20000 GEN_TOKENS=256 STEPS=5000 BATCH=32 SEQ_LEN=1024 \
#     LR=3e-4 HELDOUT_N=2000 SEEDS="0 1 2"
# (with your own data, point CORPUS at a folder laid out as data/kjv).

RUN        ?= runs/sweep
TEACHER    ?= data/demo-teacher
CORPUS     ?= data/kjv
DEVICE     ?= cpu
DTYPE      ?= auto
SEEDS      ?= 0 1
SIZES      ?= 2x 4x 8x
STRATEGIES ?= ce kd kd-cos
# The chain runs for the smallest size, through an assistant of the middle size.
CHAIN_TA   ?= 4x
CHAIN_TO   ?= 8x
SHAPE_2x   ?= --layers 3 --hidden 192 --heads 2 --kv-heads 1 --intermediate 512
SHAPE_4x   ?= --layers 2 --hidden 128 --heads 2 --kv-heads 1 --intermediate 352
SHAPE_8x   ?= --layers 2 --hidden 80 --heads 2 --kv-heads 1 --intermediate 192
FLAGS_ce     = --alpha 1 --beta 0
FLAGS_kd     = --alpha 0.5 --beta 0.5 --temperature 2 --divergence forward-kl
FLAGS_kd-cos = $(FLAGS_kd) --hidden-weight 1 --hidden-metric cosine
FLAGS_on     = --alpha 0.5 --beta 0.5 --temperature 1 --on-policy 0.5 --divergence jsd --jsd-beta 0.5 --gen-temperature 1 --gen-top-p 0.95 --gen-max-new-tokens $(GEN_TOKENS)
# A strategy's training data, when not train.jsonl.
DATA_on      = $(RUN)/transfer.jsonl
PROMPTS_N  ?= 128
CORPUS_N   ?= 600
CALIB_N    ?= 64
GEN_TOKENS ?= 32
STEPS      ?= 100
BATCH      ?= 8
SEQ_LEN    ?= 96
LR         ?= 2e-3
# Checkpoints every 25 steps: an interrupted run resumes exactly, losing at most 25 steps.
SAVE_EVERY ?= 25
HELDOUT_N  ?= 120
EVAL_N     ?= 200
GEN_N      ?= 6

INIT_CMD     ?= $(BIN)/kd-init
GENERATE_CMD ?= $(BIN)/kd-generate
DISTILL_CMD  ?= $(BIN)/kd-distill
CHAIN_CMD    ?= $(BIN)/kd-chain
EVAL_CMD     ?= $(BIN)/kd-eval
REPORT_CMD   ?= $(BIN)/kd-report

COMMON = --device $(DEVICE)
D = $(RUN)/data
M = $(RUN)/models
E = $(RUN)/eval
# Every stage appends its exact command line to the log the report's card is built from.
export KD_COMMAND_LOG := $(abspath $(RUN))/commands.jsonl

.PHONY: pipeline data generate train eval report

pipeline: build $(RUN)/report/report.md
	@echo "sweep done: $(RUN)/report/report.md and report.html"

$(D)/.ready: $(wildcard $(CORPUS)/*.jsonl.gz)
	mkdir -p $(D)
	zcat $(CORPUS)/train.jsonl.gz | head -n $(CORPUS_N) > $(D)/corpus.jsonl
	zcat $(CORPUS)/train.jsonl.gz | head -n $(CALIB_N) > $(D)/calib.jsonl
	zcat $(CORPUS)/prompts.jsonl.gz | awk 'NR % 7 == 3' | head -n $(PROMPTS_N) > $(D)/prompts.jsonl
	zcat $(CORPUS)/heldout.jsonl.gz | head -n $(HELDOUT_N) > $(D)/heldout.jsonl
	zcat $(CORPUS)/eval_mc.jsonl.gz | head -n $(EVAL_N) > $(D)/eval_mc.jsonl
	zcat $(CORPUS)/eval_cloze.jsonl.gz | head -n $(EVAL_N) > $(D)/eval_cloze.jsonl
	zcat $(CORPUS)/task.jsonl.gz | tail -n $(GEN_N) > $(D)/gen.jsonl
	$(PYTHON) scripts/environment.py > $(D)/environment.json
	touch $@
data: $(D)/.ready

# One transfer set (teacher samples) plus corpus passages: the data of every student.
$(RUN)/transfer.jsonl: $(D)/.ready
	$(GENERATE_CMD) --teacher $(TEACHER) --prompts $(D)/prompts.jsonl --out $@ --max-new-tokens $(GEN_TOKENS) --temperature 1.0 --top-p 0.95 --seed 0 --batch-size 32 $(COMMON)
$(RUN)/train.jsonl: $(RUN)/transfer.jsonl
	cat $(RUN)/transfer.jsonl $(D)/corpus.jsonl > $@.tmp && mv $@.tmp $@
generate: $(RUN)/train.jsonl

TRAIN = --steps $(STEPS) --batch-size $(BATCH) --seq-len $(SEQ_LEN) --lr $(LR) --warmup 20 --save-every $(SAVE_EVERY) --dtype $(DTYPE) $(COMMON)
EVAL_ARGS = --teacher $(TEACHER) --data $(D)/heldout.jsonl --mc $(D)/eval_mc.jsonl --cloze $(D)/eval_cloze.jsonl --speed $(COMMON)
# Generations (for the side-by-side samples) from the teacher and the seed-0 models only.
GEN_ARGS = --generate $(D)/gen.jsonl --max-new-tokens 32

# The pruned student of each size: one initialisation shared by every strategy and seed.
define size_rules
$(M)/init-$(1)/model.safetensors: $(D)/.ready
	$(INIT_CMD) --teacher $(TEACHER) --out $(M)/init-$(1) --init prune $(SHAPE_$(1)) --calib $(D)/calib.jsonl --seed 0 $(COMMON)
endef
$(foreach z,$(SIZES),$(eval $(call size_rules,$(z))))

# $(1) strategy, $(2) size, $(3) seed.
define model_rules
$(M)/$(1)-$(2)-s$(3)/model.safetensors: $(RUN)/train.jsonl $(M)/init-$(2)/model.safetensors
	$(DISTILL_CMD) $(if $(filter ce,$(1)),,--teacher $(TEACHER)) --student $(M)/init-$(2) --out $(M)/$(1)-$(2)-s$(3) $(FLAGS_$(1)) --data $(or $(DATA_$(1)),$(RUN)/train.jsonl) $(TRAIN) --seed $(3) --resume
$(E)/$(1)-$(2)-s$(3).json: $(M)/$(1)-$(2)-s$(3)/model.safetensors
	$(EVAL_CMD) --model $(M)/$(1)-$(2)-s$(3) --name $(1)-$(2)-s$(3) --strategy $(1) --out $$@ $(EVAL_ARGS) $(if $(filter 0,$(3)),$(GEN_ARGS))
endef
$(foreach s,$(STRATEGIES),$(foreach z,$(SIZES),$(foreach r,$(SEEDS),$(eval $(call model_rules,$(s),$(z),$(r))))))

# The teacher-assistant chain: teacher -> CHAIN_TA -> CHAIN_TO, the same steps per hop.
define chain_rules
$(M)/chain-$(CHAIN_TO)-s$(1)/chain.json: $(RUN)/train.jsonl
	$(CHAIN_CMD) --teacher $(TEACHER) --sizes "$$$$(echo '$(SHAPE_$(CHAIN_TA));$(SHAPE_$(CHAIN_TO))' | $(SHAPE_SPEC))" --data $(RUN)/train.jsonl --out $(M)/chain-$(CHAIN_TO)-s$(1) --steps $(STEPS) --init prune --calib $(D)/calib.jsonl --seed $(1) $(COMMON) --distill-args "$(FLAGS_kd) --batch-size $(BATCH) --seq-len $(SEQ_LEN) --lr $(LR) --warmup 20 --save-every $(SAVE_EVERY) --dtype $(DTYPE)"
$(E)/chain-$(CHAIN_TO)-s$(1).json: $(M)/chain-$(CHAIN_TO)-s$(1)/chain.json
	$(EVAL_CMD) --model $(M)/chain-$(CHAIN_TO)-s$(1)/hop2/model --name chain-$(CHAIN_TO)-s$(1) --strategy chain --out $$@ $(EVAL_ARGS) $(if $(filter 0,$(1)),$(GEN_ARGS))
endef
# kd-chain's --sizes spelling of SHAPE_* values: "--layers 2 --hidden 128" -> layers=2,hidden=128.
SHAPE_SPEC = sed -E 's/--([a-z-]+) /\1=/g; s/ *; */;/; s/ /,/g'
$(foreach r,$(SEEDS),$(eval $(call chain_rules,$(r))))

$(E)/teacher.json: $(D)/.ready
	mkdir -p $(E)
	$(EVAL_CMD) --model $(TEACHER) --name teacher --strategy teacher --out $@ $(EVAL_ARGS) $(GEN_ARGS)

MODELS = $(foreach s,$(STRATEGIES),$(foreach z,$(SIZES),$(foreach r,$(SEEDS),$(M)/$(s)-$(z)-s$(r)/model.safetensors))) \
         $(foreach r,$(SEEDS),$(M)/chain-$(CHAIN_TO)-s$(r)/chain.json)
EVALS = $(E)/teacher.json $(foreach s,$(STRATEGIES),$(foreach z,$(SIZES),$(foreach r,$(SEEDS),$(E)/$(s)-$(z)-s$(r).json))) \
        $(foreach r,$(SEEDS),$(E)/chain-$(CHAIN_TO)-s$(r).json)
train: $(MODELS)
eval: $(EVALS)

$(RUN)/report/report.md: $(EVALS)
	$(REPORT_CMD) --metrics $(EVALS) --out $(RUN)/report --baseline-strategy ce --commands $(KD_COMMAND_LOG) --environment $(D)/environment.json --html --title "Distillery sweep: size against quality on the KJV demo"
report: $(RUN)/report/report.md
