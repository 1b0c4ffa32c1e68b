from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
