# Bring your own teacher, on a GPU.
# Run:  make pipeline PIPELINE=pipelines/own-teacher-gpu.mk TEACHER=<hub id or directory> \
#         [CORPUS=<dir with train/heldout/prompts/eval_mc/eval_cloze/task .jsonl.gz>]
# The teacher must be a supported decoder (llama, mistral, qwen2, qwen3, gpt2). The student
# is the teacher pruned to half its depth and width (edit STUDENT_SHAPE for your model:
# heads must stay a multiple of kv-heads, and pruning keeps the head width). Hub models are
# fetched once into HF_HOME; set HF_HUB_OFFLINE=1 to use the cache only.
TEACHER       ?= Qwen/Qwen3-1.7B
RUN           ?= runs/own-teacher
DEVICE        ?= cuda
DTYPE         ?= bf16
STUDENT_SHAPE ?= --layers 14 --hidden 1024 --heads 8 --kv-heads 4 --intermediate 3072
TA_SIZES      ?= layers=20,hidden=1536,heads=12,kv-heads=4,intermediate=4608;layers=14,hidden=1024,heads=8,kv-heads=4,intermediate=3072
PROMPTS_N     ?= 4096
CORPUS_N      ?= 20000
CALIB_N       ?= 256
GEN_TOKENS    ?= 256
STEPS         ?= 4000
CHAIN_STEPS   ?= 2000
FT_STEPS      ?= 500
BATCH         ?= 16
SEQ_LEN       ?= 1024
LR            ?= 3e-4
FT_LR         ?= 3e-5
KD_FLAGS      ?= --alpha 0.2 --beta 0.8 --temperature 1 --divergence forward-kl
EVAL_N        ?= 400

include pipelines/default.mk
