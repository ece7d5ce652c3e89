"""The child process of :mod:`export.load_metrics`: load one model in one runtime, run it once, report.

Not imported: its source is run as ``python -I -c SOURCE REQUEST_JSON`` in a fresh interpreter, so
the process holds that runtime's libraries and nothing else (no torch in an onnxruntime child), and
its peak resident memory is that runtime's alone. Prints one JSON line: load_ms (creating the
session / loading the checkpoint into a module), first_ms (the first inference, whose one-off
costs the warm-up of a latency run hides), base_rss_bytes (resident memory before the load: the
interpreter and the runtime's libraries) and peak_rss_bytes (the process's high-water mark).
"""

import json
import sys
import time


def _status_bytes(field):
    """VmRSS / VmHWM from /proc/self/status in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_bytes():
    peak = _status_bytes("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return peak


def _onnxruntime(request):
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("kdcompress_runtime", request["root"] + "/export/runtime.py")
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)  # session options as every other onnxruntime figure is measured
    x = np.random.default_rng(0).standard_normal((request["batch"], *request["input_shape"])).astype(np.float32)
    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    session = runtime.make_session(request["path"], threads=request["threads"], providers=request["providers"])
    loaded = time.perf_counter()
    session.run(None, {session.get_inputs()[0].name: x})
    first = time.perf_counter()
    return base, loaded - start, first - loaded, session.get_providers()[0]


def _pytorch(request):
    import torch

    import importlib

    # the caller (recipes) names how a checkpoint becomes a module and what that code imports: the
    # zoo's code is the runtime's library here, so it is imported before the clock
    for name in request.get("preload") or []:
        importlib.import_module(name)
    module, _, function = request["loader"].partition(":")
    load_model = getattr(importlib.import_module(module), function)

    torch.set_num_threads(request["threads"])
    device = torch.device(request["device"])
    x = torch.randn(request["batch"], *request["input_shape"], generator=torch.Generator().manual_seed(0)).to(device)
    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    model = load_model(request["path"], arch=request.get("arch"), trust=request.get("trust", False)).model
    model = model.eval().to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loaded = time.perf_counter()
    with torch.inference_mode():
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter()
    return base, loaded - start, first - loaded, str(device)


def main():
    request = json.loads(sys.argv[1])
    sys.path.insert(0, request["root"])  # this checkout's packages (-I dropped PYTHONPATH and the script's folder)
    try:
        from compressor.errors import UserError  # a leaf module (export/__init__.py's layering rule)
    except ImportError:
        UserError = Exception
    try:
        base, load, first, provider = {"onnxruntime": _onnxruntime, "pytorch": _pytorch}[request["backend"]](request)
    except UserError as err:
        print(json.dumps({"error": str(err)}))
        return
    print(json.dumps({"load_ms": load * 1e3, "first_ms": first * 1e3, "base_rss_bytes": base,
                      "peak_rss_bytes": _peak_bytes(), "provider": provider}))


if __name__ == "__main__":  # run as ``python -I -c SOURCE``; importing it runs nothing
    main()
