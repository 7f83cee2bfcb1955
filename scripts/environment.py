"""Prints the Python-side environment of a run as JSON, for kd-report's reproducibility card
(`kd-report --environment`): the torch wheel whose libtorch the binaries link, transformers
(the reference the tests compare against), Python, the machine."""
import json
import os
import platform


def version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        return None


print(json.dumps({
    "torch": version("torch"),
    "transformers": version("transformers"),
    "python": platform.python_version(),
    "platform": platform.platform(),
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
}, indent=1))
