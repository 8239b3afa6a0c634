"""Imported by the multiprocessing fork server at its start (``set_forkserver_preload``, see
:func:`mmcap.parallel.lifetime.forkserver_dies_with_parent`): the server dies with its parent."""

from mmcap.parallel.lifetime import die_with_parent

die_with_parent()
