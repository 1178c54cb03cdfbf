"""How far the learned image projection can be trusted on a given image: a gate between it and the ImageNet prior.

A projection and sparse head trained on drawings map a photo's features to a confident but meaningless point
(measured on scikit-image's photos: cosine ~0 between a photo's projected embedding and its description, while
the ImageNet prior's ConSE embedding of the same photo reaches 0.2-0.7). The network's features say when that
happens: the training images span a low-dimensional subspace of the 1,280-d feature space, and an image unlike
them keeps most of its energy outside it. The gate measures the fraction of an image's (centred) feature energy
inside the top principal components of the training features, relative to the median fraction on held-out
images of the training domain, capped at 1:

    w(x) = min(1, e(x) / median_val e),   e(x) = ||V (f(x) - mu)||^2 / ||f(x) - mu||^2

and scales the learned parts (projected embedding, local features, sparse head) by ``w`` while the prior's parts
stay whole. An image like the training data gets w ~ 1 (nothing changes); a photo gets less of the learned map and
relies more on what the ImageNet classifier saw. There is nothing to tune: the subspace and the reference come
from the training and validation images only (:func:`fit`), and until fitted the gate is 1 everywhere.
"""

from __future__ import annotations

import torch
from torch import nn


class TrustGate(nn.Module):
    def __init__(self, feature_dim: int, components: int):
        super().__init__()
        if components <= 0 or components >= feature_dim:
            raise ValueError(f"trust_components must be in 1..{feature_dim - 1}, got {components}.")
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("basis", torch.zeros(components, feature_dim))
        self.register_buffer("reference", torch.zeros(()))  # 0: not fitted, the gate passes everything

    @property
    def fitted(self) -> bool:
        return bool(self.reference > 0)

    def energy(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B,) fraction of each image's centred feature energy inside the training subspace."""
        centred = features.float() - self.mean
        inside = (centred @ self.basis.T).pow(2).sum(dim=-1)
        return inside / centred.pow(2).sum(dim=-1).clamp(min=1e-12)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled network features -> (B, 1) weight in [0, 1] of the learned parts."""
        if not self.fitted:
            return features.new_ones((features.shape[0], 1))
        weight = (self.energy(features) / self.reference).clamp(max=1.0)
        return weight.to(features.dtype).unsqueeze(1)

    @torch.no_grad()
    def fit(self, train_features: torch.Tensor, val_features: torch.Tensor) -> None:
        """Subspace from ``train_features`` (N, C); reference = median energy fraction of ``val_features``
        (held-out images of the training domain: in-sample fractions would be optimistic)."""
        k = self.basis.shape[0]
        if len(train_features) <= k or len(val_features) == 0:
            raise ValueError(f"Fitting the trust gate needs more than {k} training images and some validation "
                             f"images; got {len(train_features)} and {len(val_features)}.")
        train = train_features.float().to(self.mean.device)
        mean = train.mean(dim=0)
        _, _, vh = torch.linalg.svd(train - mean, full_matrices=False)
        self.mean.copy_(mean)
        self.basis.copy_(vh[:k])
        self.reference.fill_(1.0)  # so that energy() reads the new subspace; the real reference follows
        self.reference.copy_(self.energy(val_features.to(self.mean.device)).median())
