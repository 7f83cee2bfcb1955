"""llama.cpp from the sources vendored in the `llama-cpp-python` sdist on PyPI: fetched once
into a cache (never into git), its `convert_hf_to_gguf.py` run as an independent GGUF
writer, and its C++ tools (`llama-server`, `llama-quantize`) built with cmake and ninja from
PyPI, the build cached.

    python3 scripts/llamacpp.py fetch          # prints the source folder
    python3 scripts/llamacpp.py build          # prints the folder holding the binaries
    python3 scripts/llamacpp.py python-server  # installs llama-cpp-python[server] (its wheel built once)
    python3 scripts/llamacpp.py convert HF_DIR OUT.gguf f32|f16|bf16|q8_0
    python3 scripts/llamacpp.py answer MODEL.gguf PROMPTS.jsonl N   # greedy chat answers via llama-server
    python3 scripts/llamacpp.py with-server MODEL.gguf 'CMD ...'    # CMD with $TEACHER_URL set to a llama-server

Cache: $DISTILLERY_CACHE (default ~/.cache/distillery)/llama.cpp/<version>.
"""
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python release; pins the vendored llama.cpp


def cache_root():
    base = os.environ.get("DISTILLERY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distillery")
    return Path(base) / "llama.cpp" / VERSION


def fetch():
    """The vendored llama.cpp folder, downloading the sdist on first use."""
    root = cache_root()
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    # PyPI's simple index (PEP 691 JSON): the per-release JSON API is not served everywhere.
    req = urllib.request.Request("https://pypi.org/simple/llama-cpp-python/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = json.load(urllib.request.urlopen(req))["files"]
    name = f"llama_cpp_python-{VERSION}.tar.gz"
    sdist = next((f for f in files if f["filename"] == name), None)
    if sdist is None:
        raise SystemExit(f"llama-cpp-python {VERSION}: no sdist {name} on PyPI's index")
    url = sdist["url"]
    tmp = root / "sdist.tar.gz.part"
    digest = hashlib.sha256()
    with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != sdist["hashes"]["sha256"]:
        tmp.unlink()
        raise SystemExit(f"{url}: sha256 {digest.hexdigest()} is not the index's {sdist['hashes']['sha256']}")
    with tarfile.open(tmp) as t:
        t.extractall(root, filter="data")
    tmp.unlink()
    return src


# Fixes applied to the vendored sources before building: (file, text, replacement, id). The
# build folder records the ids it was built with, so adding one rebuilds what it touches.
PATCHES = [
    # GCC does not know that `ldtilecfg` reads the tile configuration from memory, so it drops
    # the stores of the rows and column widths and loads a zeroed configuration: the first
    # `tilezero` then faults (SIGILL) on every CPU with AMX (the fault reported in llama.cpp's
    # pull request 26954). An empty asm that takes the address and clobbers memory keeps them.
    ("ggml/src/ggml-cpu/amx/mmq.cpp",
     "    _tile_loadconfig(&tc);\n",
     "    __asm__ __volatile__(\"\" : : \"r\"(&tc) : \"memory\");  // distillery: keep the stores to tc\n"
     "    _tile_loadconfig(&tc);\n",
     "amx-tile-config-stores"),
]


def patch_sources(src):
    """Applies PATCHES to the vendored sources (once; a patched file is left as it is) and
    returns their ids."""
    for rel, text, replacement, pid in PATCHES:
        path = src / rel
        code = path.read_text()
        if replacement in code:
            continue
        if code.count(text) != 1:
            raise SystemExit(f"{path}: the text patch {pid} replaces is not there exactly once")
        path.write_text(code.replace(text, replacement))
    return "\n".join(pid for *_, pid in PATCHES) + "\n"


def build():
    """Folder with llama-server and llama-quantize, built once (about 5-10 minutes on 2 cores;
    after a new patch, only what it touches)."""
    src = fetch()
    out = src / "build" / "bin"
    stamp = src / "build" / "distillery-patches"
    patches = patch_sources(src)
    if ((out / "llama-server").is_file() and (out / "llama-quantize").is_file() and stamp.is_file()
            and stamp.read_text() == patches):
        return out
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    for tool in ("cmake", "ninja"):
        if shutil.which(tool, path=env["PATH"]) is None:
            subprocess.run([sys.executable, "-m", "pip", "install", "--only-binary", ":all:", tool], check=True)
    # The build folder outlives the environment that configured it (a deleted venv's ninja
    # stays in its CMakeCache): name this one's ninja, and start the folder afresh if cmake
    # still cannot reuse it.
    ninja = shutil.which("ninja", path=env["PATH"])
    if ninja is None:
        raise SystemExit(f"ninja is not on PATH (nor in {venv_bin}) after installing it")
    configure = ["cmake", "-S", str(src), "-B", str(src / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_MAKE_PROGRAM={ninja}",
                 "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    first = subprocess.run(configure, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if first.returncode != 0:
        if not (src / "build" / "CMakeCache.txt").is_file():  # not a stale folder: a real failure
            raise SystemExit(f"cmake could not configure llama.cpp:\n{first.stderr[-3000:]}")
        shutil.rmtree(src / "build")
        subprocess.run(configure, check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(src / "build"), "--target", "llama-server", "llama-quantize",
                    "-j", str(os.cpu_count() or 2)], check=True, env=env, stdout=subprocess.DEVNULL)
    stamp.write_text(patches)
    return out


def python_server():
    """llama-cpp-python's server (`python -m llama_cpp.server`, the llama.cpp-based server that
    scores given text with `echo`) installed into this interpreter's environment, from a wheel
    built once from the same sdist into the cache (about 5-10 minutes on 2 cores)."""
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server.app  # noqa: F401
        if llama_cpp.__version__ == VERSION:
            return
    except ImportError:
        pass
    patch_sources(fetch())  # for a wheel built here; one already in the cache is kept
    wheels = cache_root() / "wheel"
    found = sorted(wheels.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    if not found:
        venv_bin = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels),
                        str(cache_root() / f"llama_cpp_python-{VERSION}")], check=True, env=env)
        found = sorted(wheels.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{found[0]}[server]"], check=True)


def serve_python(gguf, port, ctx=2048):
    """llama-cpp-python's server on 127.0.0.1 for `gguf` (log-probabilities of every position
    kept: `--logits_all true`), once it lists its model."""
    import time

    python_server()
    log = open(Path(str(gguf) + f".{port}.py-server.log"), "ab")
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(os.cpu_count() or 2),
                               "--logits_all", "true"], stdout=log, stderr=log)
    for _ in range(600):
        if server.poll() is not None:
            raise SystemExit("llama-cpp-python's server exited: " + Path(log.name).read_text()[-2000:])
        try:
            if json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)).get("data"):
                return server
        except Exception:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("llama-cpp-python's server did not start")


def convert(hf_dir, out, outtype):
    """llama.cpp's own converter. Tiny test tokenizers are not in its table of known
    pre-tokenizers (it recognises them by hashing their output), so they are declared
    GPT-2's, which is what they are (ByteLevel with GPT-2's split)."""
    src = fetch()
    sys.path.insert(0, str(src))
    sys.path.insert(1, str(src / "gguf-py"))
    import conversion.base as base  # noqa: E402

    known = base.TextModel.get_vocab_base_pre

    def pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = pre
    sys.argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")


def serve(gguf, port, ctx=2048, parallel=1):
    """A llama-server on 127.0.0.1 for `gguf`, once it answers /health. `parallel` slots share
    the `ctx` tokens of context."""
    import socket
    import time

    server = subprocess.Popen([str(build() / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                               "-c", str(ctx), "-np", str(parallel), "-t", str(os.cpu_count() or 2), "--no-warmup"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            if json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)).get("status") == "ok":
                return server
        except Exception:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("llama-server did not start")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_server(gguf, command):
    """Runs `command` (a shell line) with TEACHER_URL pointing at a llama-server for `gguf` on
    127.0.0.1 (slots and context from LLAMA_PARALLEL, default 16, and LLAMA_CTX, default
    256 tokens per slot); the server is stopped afterwards. Exits with the command's status."""
    parallel = int(os.environ.get("LLAMA_PARALLEL", "16"))
    port = free_port()
    server = serve(gguf, port, ctx=parallel * int(os.environ.get("LLAMA_CTX", "256")), parallel=parallel)
    try:
        rc = subprocess.run(command, shell=True, env={**os.environ, "TEACHER_URL": f"http://127.0.0.1:{port}"}).returncode
    finally:
        server.terminate()
        server.wait(timeout=30)
    sys.exit(rc)


def answer(gguf, prompts, n):
    """Greedy answers of llama.cpp for the first `n` prompts, through the GGUF's chat template."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(gguf, port)
    try:
        for line in list(open(prompts))[: int(n)]:
            rec = json.loads(line)
            body = json.dumps({"messages": [{"role": "user", "content": rec["prompt"]}], "temperature": 0,
                               "max_tokens": 64}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
            out = json.load(urllib.request.urlopen(req, timeout=300))
            print(f"## {rec['prompt']}\n\n{out['choices'][0]['message']['content'].strip()}\n")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "fetch":
        print(fetch())
    elif cmd == "build":
        print(build())
    elif cmd == "python-server":
        python_server()
    elif cmd == "convert":
        convert(*sys.argv[2:5])
    elif cmd == "with-server":
        with_server(sys.argv[2], " ".join(sys.argv[3:]))
    elif cmd == "answer":
        answer(*sys.argv[2:5])
    else:
        sys.exit(f"unknown command {cmd}")
