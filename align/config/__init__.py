"""Recipe configuration (pydantic, no torch). Stage kinds: one module each, listed in ``registry``."""
