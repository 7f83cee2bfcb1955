# A student with its own small tokenizer against a student of about the same size with the
# teacher's, on the KJV demo (issue: cross-tokenizer distillation). The 4M-parameter teacher
# has a 4096-token vocabulary; at hidden width 128 its embedding is 524k of the 894k
# parameters of the default 2-layer student. kd-tokenizer fits a 1024-token BPE to the
# corpus, which frees enough parameters for two more layers (870k parameters in all):
#   same      teacher's tokenizer, 2 layers, pruned, KD (forward KL, T 2)
#   own-gold  own tokenizer, 4 layers, pruned, embeddings composed from the teacher's rows,
#             GOLD (forward KL on tokens both vocabularies share, ULD on the rest)
#   own-uld   the same student, ULD (sorted-probability distance per aligned span)
# All at alpha 0.5, beta 0.5, T 2, equal steps and batches, two seeds. Compared by bits per
# byte on held-out text (per-token perplexity is not comparable across tokenizers), ROUGE-L
# of greedy continuations, size on disk and speed.
# Run:  make pipeline PIPELINE=pipelines/cross-tokenizer.mk

RUN        ?= runs/cross-tokenizer
TEACHER    ?= data/demo-teacher
CORPUS     ?= data/kjv
DEVICE     ?= cpu
SEEDS      ?= 0 1
STRATEGIES ?= same own-gold own-uld
VOCAB      ?= 1024
SHAPE_same ?= --layers 2 --hidden 128 --heads 2 --kv-heads 1 --intermediate 352
SHAPE_own  ?= --layers 4 --hidden 128 --heads 2 --kv-heads 1 --intermediate 352
CORPUS_N   ?= 2000
PROMPTS_N  ?= 512
HELDOUT_N  ?= 300
GEN_TOKENS ?= 48
STEPS      ?= 300
BATCH      ?= 16
SEQ_LEN    ?= 160
LR         ?= 2e-3
KD          = --alpha 0.5 --beta 0.5 --temperature 2 --divergence forward-kl
FLAGS_same     = $(KD)
FLAGS_own-gold = $(KD) --cross-tokenizer gold
FLAGS_own-uld  = $(KD) --cross-tokenizer uld
INIT_same      = same
INIT_own-gold  = own
INIT_own-uld   = own
# The pair the report's paired verdicts judge (bits per byte is the comparable one).
REPORT_PAIR   ?= --student own-gold-s0 --baseline same-s0

INIT_CMD      ?= $(BIN)/kd-init
TOKENIZER_CMD ?= $(BIN)/kd-tokenizer
GENERATE_CMD  ?= $(BIN)/kd-generate
DISTILL_CMD   ?= $(BIN)/kd-distill
EVAL_CMD      ?= $(BIN)/kd-eval
REPORT_CMD    ?= $(BIN)/kd-report

COMMON = --device $(DEVICE)
D = $(RUN)/data
M = $(RUN)/models
E = $(RUN)/eval
export KD_COMMAND_LOG := $(abspath $(RUN))/commands.jsonl

.PHONY: pipeline

pipeline: build $(RUN)/report/report.md
	@echo "cross-tokenizer comparison done: $(RUN)/report/report.md"

$(D)/.ready: $(wildcard $(CORPUS)/*.jsonl.gz)
	mkdir -p $(D)
	zcat $(CORPUS)/train.jsonl.gz | head -n $(CORPUS_N) > $(D)/corpus.jsonl
	zcat $(CORPUS)/train.jsonl.gz | head -n 64 > $(D)/calib.jsonl
	zcat $(CORPUS)/prompts.jsonl.gz | awk 'NR % 7 == 3' | head -n $(PROMPTS_N) > $(D)/prompts.jsonl
	zcat $(CORPUS)/heldout.jsonl.gz | head -n $(HELDOUT_N) > $(D)/heldout.jsonl
	zcat $(CORPUS)/task.jsonl.gz | tail -n 50 > $(D)/gen.jsonl
	$(PYTHON) scripts/environment.py > $(D)/environment.json
	touch $@

$(RUN)/transfer.jsonl: $(D)/.ready
	$(GENERATE_CMD) --teacher $(TEACHER) --prompts $(D)/prompts.jsonl --out $@ --max-new-tokens $(GEN_TOKENS) --temperature 1.0 --top-p 0.95 --seed 0 --batch-size 32 $(COMMON)

$(RUN)/train.jsonl: $(RUN)/transfer.jsonl $(D)/.ready
	cat $(RUN)/transfer.jsonl $(D)/corpus.jsonl > $@.tmp && mv $@.tmp $@

# The student's own vocabulary, fitted to the corpus; special tokens and template from the teacher.
$(RUN)/tokenizer/tokenizer.json: $(D)/.ready
	$(TOKENIZER_CMD) --data $(D)/corpus.jsonl --vocab-size $(VOCAB) --like $(TEACHER) --out $(RUN)/tokenizer

$(M)/init-same/model.safetensors: $(D)/.ready
	$(INIT_CMD) --teacher $(TEACHER) --out $(M)/init-same --init prune $(SHAPE_same) --calib $(D)/calib.jsonl --seed 0 $(COMMON)
$(M)/init-own/model.safetensors: $(D)/.ready $(RUN)/tokenizer/tokenizer.json
	$(INIT_CMD) --teacher $(TEACHER) --tokenizer $(RUN)/tokenizer --out $(M)/init-own --init prune $(SHAPE_own) --calib $(D)/calib.jsonl --seed 0 $(COMMON)

EVAL_ARGS = --teacher $(TEACHER) --data $(D)/heldout.jsonl --generate $(D)/gen.jsonl --speed $(COMMON)

# $(1) strategy, $(2) seed.
define model_rules
$(M)/$(1)-s$(2)/model.safetensors: $(RUN)/train.jsonl $(M)/init-$(INIT_$(1))/model.safetensors
	$(DISTILL_CMD) --teacher $(TEACHER) --student $(M)/init-$(INIT_$(1)) --out $(M)/$(1)-s$(2) $(FLAGS_$(1)) --data $(RUN)/train.jsonl --steps $(STEPS) --batch-size $(BATCH) --seq-len $(SEQ_LEN) --lr $(LR) --warmup 20 --save-every 50 --seed $(2) $(COMMON) --resume
$(E)/$(1)-s$(2).json: $(M)/$(1)-s$(2)/model.safetensors
	mkdir -p $(E)
	$(EVAL_CMD) --model $(M)/$(1)-s$(2) --name $(1)-s$(2) --strategy $(1) --out $$@ $(EVAL_ARGS)
endef
$(foreach s,$(STRATEGIES),$(foreach r,$(SEEDS),$(eval $(call model_rules,$(s),$(r)))))

$(E)/teacher.json: $(D)/.ready
	mkdir -p $(E)
	$(EVAL_CMD) --model $(TEACHER) --name teacher --strategy teacher --out $@ $(EVAL_ARGS)

EVALS = $(E)/teacher.json $(foreach s,$(STRATEGIES),$(foreach r,$(SEEDS),$(E)/$(s)-s$(r).json))

$(RUN)/report/report.md: $(EVALS)
	$(REPORT_CMD) --metrics $(EVALS) --out $(RUN)/report $(REPORT_PAIR) --commands $(KD_COMMAND_LOG) --environment $(D)/environment.json --html --title "Distillery: a student with its own tokenizer on the KJV demo"
