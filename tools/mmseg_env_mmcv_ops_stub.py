"""mmcv-lite has no compiled mmcv._ext, so `import mmcv.ops` fails; mmseg 1.2.2 imports mmcv.ops.point_sample at
import time. Put a module `mmcv.ops` in sys.modules whose point_sample & co. come from mmcv's pure-PyTorch
ops/point_sample.py; any other name is a placeholder that raises if used."""
import importlib.util
import os
import sys
import types


def _install():
    spec = importlib.util.find_spec('mmcv')
    if spec is None or 'mmcv.ops' in sys.modules:
        return
    path = os.path.join(os.path.dirname(spec.origin), 'ops', 'point_sample.py')
    mod = types.ModuleType('mmcv.ops')
    mod.__path__ = []
    src = open(path).read()
    ns = {'__name__': 'mmcv.ops.point_sample'}
    try:
        exec(compile(src, path, 'exec'), ns)
    except Exception:  # pragma: no cover
        ns = {}
    for k, v in ns.items():
        if not k.startswith('__'):
            setattr(mod, k, v)

    mod.__file__ = path

    def __getattr__(name):
        if name.startswith('__'):
            raise AttributeError(name)

        def placeholder(*a, **k):
            raise RuntimeError(f'mmcv.ops.{name} needs compiled mmcv (stub in mmseg_env)')
        return placeholder
    mod.__getattr__ = __getattr__
    sys.modules['mmcv.ops'] = mod


_install()
