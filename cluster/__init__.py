"""Fleet knowledge, the bottom layer: tiers, profiles, the memory and time models, planning and calibration, request
shapes, the NVML inventory, and the pipeline itself (find, fetch, load, run). No Ray, no Serve."""
