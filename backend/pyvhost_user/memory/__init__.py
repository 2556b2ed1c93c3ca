"""Memory layer: guest regions mapped from fds, translated to zero-copy views."""

from .errors import BadMemoryRegion, GuestMemoryError, UnmappedAddress
from .address_space import AddressSpace, DirectSpace
from .guest_memory import PAGE_SIZE, GuestMemory, MappedRegion, map_region
from .peer_fd import PeerFdError, SealPolicy, map_peer_fd

__all__ = [
    "PAGE_SIZE",
    "AddressSpace",
    "DirectSpace",
    "BadMemoryRegion",
    "GuestMemory",
    "GuestMemoryError",
    "MappedRegion",
    "PeerFdError",
    "SealPolicy",
    "UnmappedAddress",
    "map_peer_fd",
    "map_region",
]
