"""Run queries, the Zarr memory store and offline analysis."""
