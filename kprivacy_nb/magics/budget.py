"""Placeholder: filled in by the issue that owns these magics."""

from IPython.core.magic import Magics, magics_class


@magics_class
class BudgetMagics(Magics):
    pass
