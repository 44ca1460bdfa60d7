"""Region selection and encoding: proposals + user/GT boxes -> kept regions -> region tokens."""

from .roi_encoder import RoIRegionEncoder
from .selector import RegionSelection, RegionSelector

__all__ = ["RegionSelection", "RegionSelector", "RoIRegionEncoder"]
