# Sharded stages, a worked example: kd-generate (with stored logits), kd-filter and kd-eval
# fanned out over $(SHARDS) local processes, each stage joined by kd-merge into exactly the
# bytes an unsharded run writes (time and memory figures of kd-eval aside).
# Run:  make -j4 pipeline PIPELINE=pipelines/sharded.mk SHARDS=4
#       make -j4 pipeline PIPELINE=pipelines/sharded.mk SHARDS=4 CHECK=1   (also runs each
#       stage unsharded and compares the bytes)
# Every shard is its own file target: `make -j N` runs N of them at once, an interrupted
# run redoes only the missing shards, and a shard that fails leaves the others in place.
# The same commands run as a Slurm array: see README.md, "Sharding a stage".

RUN        ?= runs/sharded
TEACHER    ?= data/demo-teacher
CORPUS     ?= data/kjv
DEVICE     ?= cpu
SEED       ?= 0
SHARDS     ?= 4
PROMPTS_N  ?= 256
HELDOUT_N  ?= 400
GEN_TOKENS ?= 48
TOPK       ?= 64
BATCH      ?= 16
CHECK      ?=

COMMON = --device $(DEVICE)
D = $(RUN)/data
IDS := $(shell seq 0 $$(($(SHARDS) - 1)))
export KD_COMMAND_LOG := $(abspath $(RUN))/commands.jsonl

.PHONY: pipeline data generate filter eval check

pipeline: build $(RUN)/eval.json $(if $(CHECK),check)
	@echo "pipeline done: $(RUN)/transfer.jsonl (+ sidecar, summary), $(RUN)/filtered.jsonl, $(RUN)/eval.json"

$(D)/.ready: $(wildcard $(CORPUS)/*.jsonl.gz)
	mkdir -p $(D)
	zcat $(CORPUS)/prompts.jsonl.gz | awk 'NR % 7 == 3' | head -n $(PROMPTS_N) > $(D)/prompts.jsonl
	zcat $(CORPUS)/heldout.jsonl.gz | head -n $(HELDOUT_N) > $(D)/heldout.jsonl
	touch $@
data: $(D)/.ready

# One target per shard; kd-merge needs them all.
GEN_FLAGS = --teacher $(TEACHER) --prompts $(D)/prompts.jsonl --max-new-tokens $(GEN_TOKENS) --temperature 1.0 --top-p 0.95 --seed $(SEED) --store-logits $(TOPK) --logits-format compact --batch-size $(BATCH) $(COMMON)
$(RUN)/shards/transfer.%.jsonl: $(D)/.ready
	mkdir -p $(RUN)/shards
	$(BIN)/kd-generate $(GEN_FLAGS) --out $@ --shard $*/$(SHARDS) --resume
$(RUN)/transfer.jsonl: $(foreach i,$(IDS),$(RUN)/shards/transfer.$(i).jsonl)
	$(BIN)/kd-merge --out $@ $^
generate: $(RUN)/transfer.jsonl

FILTER_FLAGS = --teacher $(TEACHER) --data $(RUN)/transfer.jsonl --dedup near --select teacher_confidence:top:0.7 --min-tokens 8 --batch-size $(BATCH) $(COMMON)
$(RUN)/shards/filtered.%.jsonl: $(RUN)/transfer.jsonl
	$(BIN)/kd-filter $(FILTER_FLAGS) --out $@ --shard $*/$(SHARDS) --resume
$(RUN)/filtered.jsonl: $(foreach i,$(IDS),$(RUN)/shards/filtered.$(i).jsonl)
	$(BIN)/kd-merge --out $@ $^
filter: $(RUN)/filtered.jsonl

EVAL_FLAGS = --model $(TEACHER) --name teacher --data $(D)/heldout.jsonl --batch-size $(BATCH) $(COMMON)
$(RUN)/shards/eval.%.json: $(D)/.ready $(RUN)/filtered.jsonl
	$(BIN)/kd-eval $(EVAL_FLAGS) --out $@ --shard $*/$(SHARDS) --resume
$(RUN)/eval.json: $(foreach i,$(IDS),$(RUN)/shards/eval.$(i).json)
	$(BIN)/kd-merge --out $@ $^
eval: $(RUN)/eval.json

# CHECK=1: the same stages unsharded, compared byte for byte with the joined shards.
check: $(RUN)/eval.json
	mkdir -p $(RUN)/whole
	$(BIN)/kd-generate $(GEN_FLAGS) --out $(RUN)/whole/transfer.jsonl
	$(BIN)/kd-filter $(subst $(RUN)/transfer.jsonl,$(RUN)/whole/transfer.jsonl,$(FILTER_FLAGS)) --out $(RUN)/whole/filtered.jsonl
	$(BIN)/kd-eval $(EVAL_FLAGS) --out $(RUN)/whole/eval.json
	for f in transfer.jsonl transfer.jsonl.logits.topk transfer.jsonl.summary.json filtered.jsonl filtered.jsonl.summary.json eval.items.json; do \
	  cmp $(RUN)/whole/$$f $(RUN)/$$f || exit 1; done
	@echo "check: the joined shards equal the unsharded run byte for byte"
