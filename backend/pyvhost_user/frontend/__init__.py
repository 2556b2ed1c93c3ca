"""The reference vhost-user front-end: drives any vhost-user(-blk) backend without a VM."""

from .blk import (
    BLK_CONFIG_SIZE,
    BLK_DRIVER_FEATURES,
    BlkCompletion,
    BlkConfig,
    BlkDriver,
    BlkIOError,
    BlkRequest,
    BlkStatusError,
    BlkUnsupported,
    Ticket,
)
from .client import PROFILES, Frontend, MissResponder, Profile, QueueState
from .errors import (
    BackendClosed,
    BackendRefused,
    FrontendError,
    FrontendTimeout,
    NotNegotiated,
    ProtocolViolation,
    RingError,
)
from .guest_ram import GuestRam, GuestRamError, RamRegion
from .iommu import IOVA_OFFSET, Iommu, IommuEntry, IommuFault, LinearIommu
from .split_ring import Descriptor, Segment, SplitRing, vring_need_event

__all__ = [name for name in dir() if not name.startswith("_")]
