"""Model loading (stub: eval helper owns it)."""


def load_model(spec, **kwargs):
    raise NotImplementedError
