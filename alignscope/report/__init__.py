"""Reading and presenting results: tables, verdicts, figures, the HTML page, the gate, comparisons.

Only pandas, numpy and matplotlib here, never torch, so that ``alignscope plot``, ``check``
and ``compare`` read a CSV without importing the model side. Lowest first:
:mod:`.files` (atomic, never-overwriting writes), :mod:`.output_rows` (telling output rows
from layer rows), :mod:`.caveats`, :mod:`.verdicts`, :mod:`.gate`, :mod:`.plots`, :mod:`.html`,
:mod:`.report` (:class:`AlignmentReport`), :mod:`.comparison`.
"""
