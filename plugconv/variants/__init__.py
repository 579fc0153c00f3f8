"""Built-in variants, one paper per file; importing this package registers them all."""

from plugconv.variants import acb, conv, saconv, scconv, selfcal, spconv  # noqa: F401
