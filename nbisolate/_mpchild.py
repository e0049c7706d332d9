"""``__main__`` of a child that multiprocessing spawns from an isolated cell or a notebook.

A spawned child rebuilds its parent's ``__main__`` from a path or a module
name; a notebook (and an isolated cell's worker) has neither, so
:mod:`nbisolate.pools` names this module instead. Running it installs the
child's hooks before the child loads its task: notebook objects go back to
the parent as themselves, and a pool worker that dies says why. It leaves no
names behind: the functions sent by value set their globals in this module's
namespace (only where a name is free).
"""

import nbisolate.pools as _pools

_pools.child_hooks()
del _pools
