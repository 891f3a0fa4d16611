"""Floor 4, reading a run: gate statistics and the training phases (`gates`), and every figure (`figures`). Imports
the leaves (the run folder's files through `adapterlib.runs`) and nothing that trains or samples."""
