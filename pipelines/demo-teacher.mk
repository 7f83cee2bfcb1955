# Reproduces the committed demo teacher (data/demo-teacher) with the project's own code:
#   make demo-teacher                 (CPU, about 10 minutes on 2 cores)
#   make demo-teacher DEMO_DEVICE=cuda
# A byte-level BPE tokenizer (4096 tokens) trained on the training split, a 4M-parameter
# Llama (pipelines/configs/demo-teacher.json), 2000 steps of CE training with kd-distill
# (no teacher: alpha=1, beta=0), exported in bf16.
DEMO_RUN    ?= runs/demo-teacher
DEMO_OUT    ?= data/demo-teacher
DEMO_DEVICE ?= cpu
DEMO_STEPS  ?= 2000

demo-teacher: build
	mkdir -p $(DEMO_RUN)
	zcat data/kjv/train.jsonl.gz > $(DEMO_RUN)/train.jsonl
	zcat data/kjv/heldout.jsonl.gz > $(DEMO_RUN)/heldout.jsonl
	$(PYTHON) scripts/make_tokenizer.py data/kjv/train.jsonl.gz $(DEMO_RUN)/tokenizer 4096
	$(BIN)/kd-init --config pipelines/configs/demo-teacher.json --tokenizer $(DEMO_RUN)/tokenizer --out $(DEMO_RUN)/init --seed 0 --device $(DEMO_DEVICE)
	$(BIN)/kd-distill --student $(DEMO_RUN)/init --data $(DEMO_RUN)/train.jsonl --eval-data $(DEMO_RUN)/heldout.jsonl \
	  --out $(DEMO_RUN)/trained --steps $(DEMO_STEPS) --alpha 1 --beta 0 --batch-size 16 --seq-len 256 --lr 3e-3 \
	  --warmup 100 --eval-every 500 --save-every 250 --log-every 10 --seed 0 --device $(DEMO_DEVICE) --resume
	$(BIN)/kd-init --teacher $(DEMO_RUN)/trained --init copy-layers --out $(DEMO_RUN)/bf16 --dtype bf16 --device cpu
	rm -rf $(DEMO_OUT) && mkdir -p $(DEMO_OUT)
	cp $(DEMO_RUN)/bf16/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json} $(DEMO_OUT)/
	$(BIN)/kd-eval --model $(DEMO_OUT) --data $(DEMO_RUN)/heldout.jsonl --out $(DEMO_OUT)/heldout_metrics.json --device cpu
