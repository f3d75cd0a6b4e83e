"""Applications on top of the Python API (:class:`cpmlive.api.LM`): the headline generator
(智取标题) and task evaluation. Nothing below ``cpmlive.api`` imports them."""
