"""NBD front end: serves any `Export` by name over TCP and unix sockets.

from pxcluster.nbd import Export, ExportRegistry, NbdServer, MemoryExport
"""

from pxcluster.nbd.export import Export, ExportRegistry, nbd_error
from pxcluster.nbd.memory import MemoryExport
from pxcluster.nbd.server import NbdServer

__all__ = ["Export", "ExportRegistry", "MemoryExport", "NbdServer", "nbd_error"]
