"""fastner.nn.CRF: a linear-chain CRF, drop-in for torchcrf.CRF."""
__all__ = []
