"""Imported by the supervisor's fork server only (it is the first module of its preload list,
``supervisor._process_context``): importing it makes the importing process die with its parent.

Python's fork server exits once every process holding its "alive" pipe has ended, and it hands
that pipe to every child it forks, while the children die with their parent, the fork server
(``lifetime.die_with_parent``). Left so, a supervisor killed with SIGKILL would leave the fork
server and its receivers running and accepting on the DICOM port. With the fork server itself
dying with the supervisor, the whole tree goes: supervisor, fork server, receivers and workers.
"""

from __future__ import annotations

from triage_node.service.lifetime import die_with_parent

die_with_parent()
