# The default pipeline with the teacher behind an inference server: here a llama.cpp
# `llama-server` that the pipeline starts itself on 127.0.0.1, serving an F32 GGUF that
# kd-export writes from the demo teacher. kd-generate samples the transfer set through the
# server and captures the teacher's top-K of every generated token (--store-logits); the
# student is then distilled offline from what was captured, with no teacher in the process.
# Run:  make pipeline PIPELINE=pipelines/served-teacher.mk
# Against a server you run yourself (vLLM, SGLang; see README):
#       make pipeline PIPELINE=pipelines/served-teacher.mk TEACHER_URL=http://HOST:8000 TEACHER_TOKENIZER=<model dir or hub id>
# llama.cpp's server cannot score given text (no echo), so the teacher-scored filter and the
# teacher-KL columns of the default pipeline are left out; with vLLM or SGLang kd-generate
# --score works the same way.

RUN        ?= runs/served-teacher
TEACHER    ?= data/demo-teacher
TEACHER_TOKENIZER ?= $(TEACHER)
# Empty: a llama-server for $(RUN)/teacher-f32.gguf, started for the generate stage only.
TEACHER_URL ?=
# 1: generate with the teacher in this process instead (the local-teacher comparison run).
LOCAL_TEACHER ?=
CORPUS     ?= data/kjv
DEVICE     ?= cpu
DTYPE      ?= auto
SEED       ?= 0
STUDENT_SHAPE ?= --layers 2 --hidden 128 --heads 2 --kv-heads 1 --intermediate 352
INIT       ?= prune
PROMPTS_N  ?= 512
CORPUS_N   ?= 2000
CALIB_N    ?= 64
GEN_TOKENS ?= 48
TOP_K      ?= 20
IN_FLIGHT  ?= 16
STEPS      ?= 400
BATCH      ?= 16
SEQ_LEN    ?= 160
LR         ?= 2e-3
KD_FLAGS   ?= --alpha 0.5 --beta 0.5 --temperature 2 --divergence forward-kl
EVAL_N     ?= 200
HELDOUT_N  ?= 1000
EVAL_TASKS ?= --mc $(RUN)/data/eval_mc.jsonl --cloze $(RUN)/data/eval_cloze.jsonl --limit $(EVAL_N)

COMMON = --device $(DEVICE)
D = $(RUN)/data
export KD_COMMAND_LOG := $(abspath $(RUN))/commands.jsonl
SERVED = --teacher-tokenizer $(TEACHER_TOKENIZER) --teacher-concurrency $(IN_FLIGHT)

.PHONY: pipeline data init gguf generate distill baseline eval report

pipeline: build $(RUN)/report/report.md
	@echo "pipeline done: $(RUN)/report/report.md"

$(D)/.ready: $(wildcard $(CORPUS)/*.jsonl.gz)
	mkdir -p $(D)
	zcat $(CORPUS)/train.jsonl.gz | head -n $(CORPUS_N) > $(D)/corpus.jsonl
	zcat $(CORPUS)/train.jsonl.gz | head -n $(CALIB_N) > $(D)/calib.jsonl
	zcat $(CORPUS)/prompts.jsonl.gz | awk 'NR % 7 == 3' | head -n $(PROMPTS_N) > $(D)/prompts.jsonl
	zcat $(CORPUS)/heldout.jsonl.gz | head -n $(HELDOUT_N) > $(D)/heldout.jsonl
	zcat $(CORPUS)/eval_mc.jsonl.gz > $(D)/eval_mc.jsonl
	zcat $(CORPUS)/eval_cloze.jsonl.gz > $(D)/eval_cloze.jsonl
	$(PYTHON) scripts/environment.py > $(D)/environment.json
	touch $@
data: $(D)/.ready

# The served file: F32, so the server computes what the local teacher does.
$(RUN)/teacher-f32.gguf: $(D)/.ready
	$(BIN)/kd-export --model $(TEACHER) --format gguf --type f32 --out $@
gguf: $(RUN)/teacher-f32.gguf

$(RUN)/student-init/model.safetensors: $(D)/.ready
	$(BIN)/kd-init --teacher $(TEACHER) --out $(RUN)/student-init --init $(INIT) $(STUDENT_SHAPE) --calib $(D)/calib.jsonl --seed $(SEED) $(COMMON)
init: $(RUN)/student-init/model.safetensors

GENERATE = $(BIN)/kd-generate $(SERVED) --prompts $(D)/prompts.jsonl --out $(RUN)/transfer.jsonl --max-new-tokens $(GEN_TOKENS) --temperature 1.0 --top-p 0.95 --seed $(SEED) --batch-size 64 --store-logits $(TOP_K) --resume
ifeq ($(LOCAL_TEACHER),1)
# The comparison run (docs/RESULTS.md): the same stages with the teacher in this process.
$(RUN)/transfer.jsonl: $(D)/.ready
	$(BIN)/kd-generate --teacher $(TEACHER) --prompts $(D)/prompts.jsonl --out $@ --max-new-tokens $(GEN_TOKENS) --temperature 1.0 --top-p 0.95 --seed $(SEED) --batch-size 64 --store-logits $(TOP_K) --resume $(COMMON)
else ifeq ($(TEACHER_URL),)
$(RUN)/transfer.jsonl: $(D)/.ready $(RUN)/teacher-f32.gguf
	$(PYTHON) scripts/llamacpp.py build > /dev/null
	LLAMA_PARALLEL=$(IN_FLIGHT) $(PYTHON) scripts/llamacpp.py with-server $(RUN)/teacher-f32.gguf '$(GENERATE) --teacher-url $$TEACHER_URL'
else
$(RUN)/transfer.jsonl: $(D)/.ready
	$(GENERATE) --teacher-url $(TEACHER_URL)
endif
generate: $(RUN)/transfer.jsonl

TRAIN_FLAGS = --steps $(STEPS) --batch-size $(BATCH) --seq-len $(SEQ_LEN) --lr $(LR) --warmup 20 --eval-data $(D)/heldout.jsonl --eval-every 100 --save-every 100 --seed $(SEED) --dtype $(DTYPE) $(COMMON) --resume

# Offline distillation from the captured top-K: no teacher model in this process.
$(RUN)/distilled/model.safetensors: $(RUN)/transfer.jsonl $(RUN)/student-init/model.safetensors
	$(BIN)/kd-distill --student $(RUN)/student-init --data $(RUN)/transfer.jsonl --teacher-logits $(RUN)/transfer.jsonl.logits.safetensors --out $(RUN)/distilled $(KD_FLAGS) $(TRAIN_FLAGS)
distill: $(RUN)/distilled/model.safetensors

$(RUN)/baseline/model.safetensors: $(RUN)/transfer.jsonl $(RUN)/student-init/model.safetensors
	$(BIN)/kd-distill --student $(RUN)/student-init --data $(RUN)/transfer.jsonl --out $(RUN)/baseline --alpha 1 --beta 0 $(TRAIN_FLAGS)
baseline: $(RUN)/baseline/model.safetensors

EVAL_ARGS = --data $(D)/heldout.jsonl $(EVAL_TASKS) --csv $(RUN)/eval/all.csv $(COMMON) --resume
$(RUN)/eval/distilled.json: $(RUN)/distilled/model.safetensors
	mkdir -p $(RUN)/eval
	$(BIN)/kd-eval --model $(RUN)/distilled --name served-kd --strategy kd --out $@ $(EVAL_ARGS)
$(RUN)/eval/baseline.json: $(RUN)/baseline/model.safetensors
	mkdir -p $(RUN)/eval
	$(BIN)/kd-eval --model $(RUN)/baseline --name ce-baseline --strategy ce --out $@ $(EVAL_ARGS)
EVALS = $(addprefix $(RUN)/eval/,distilled.json baseline.json)
eval: $(EVALS)

$(RUN)/report/report.md: $(EVALS)
	$(BIN)/kd-report --metrics $(EVALS) --out $(RUN)/report --student served-kd --baseline ce-baseline --commands $(KD_COMMAND_LOG) --environment $(D)/environment.json --title "Distillery: teacher served by llama.cpp"
report: $(RUN)/report/report.md
