"""Adversarial refinement: a discriminator judges (image, mask) pairs, real masks against the
segmenter's softmax, and the segmenter is pushed to produce masks it cannot tell from real ones.

Used by ``aireconstruct train --adversarial``: after ``warmup_epochs`` the segmenter's loss gains
``weight`` x the adversarial loss, and the discriminator takes one step per training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Discriminator(nn.Module):
    """A small 3D convolutional (PatchGAN-style) critic: one real/fake logit per region."""

    def __init__(self, in_channels: int, width: int = 16):
        super().__init__()
        layers, channels = [], in_channels
        for n, out in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv3d(channels, out, 4, stride=2, padding=1)]
            if n:
                layers += [nn.InstanceNorm3d(out)]
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            channels = out
        layers += [nn.Conv3d(channels, 1, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([image, mask], dim=1))


class AdversarialRefinement:
    """The discriminator, its optimiser and the two losses."""

    def __init__(self, image_channels: int, num_classes: int, device, weight: float = 0.01,
                 warmup_epochs: int = 5, learning_rate: float = 2e-4, average_gradients=lambda module: None):
        self.num_classes = num_classes
        self.weight, self.warmup_epochs = weight, warmup_epochs
        self.average_gradients = average_gradients  # across training processes, under torchrun
        self.discriminator = Discriminator(image_channels + num_classes).to(device)
        self.optimiser = torch.optim.Adam(self.discriminator.parameters(), lr=learning_rate, betas=(0.5, 0.999))

    def active(self, epoch: int) -> bool:
        return epoch > self.warmup_epochs

    def segmenter_loss(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Weighted loss for the segmenter: its masks should be judged real."""
        judged = self.discriminator(images, logits.softmax(1))
        return self.weight * F.binary_cross_entropy_with_logits(judged, torch.ones_like(judged))

    def discriminator_step(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> float:
        """One step for the discriminator on real masks vs the segmenter's (detached) softmax."""
        real_masks = F.one_hot(labels[:, 0].long(), self.num_classes).permute(0, 4, 1, 2, 3).float()
        real = self.discriminator(images, real_masks)
        fake = self.discriminator(images, logits.detach().softmax(1))
        loss = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                      + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.average_gradients(self.discriminator)
        self.optimiser.step()
        return loss.item()

    def state_dict(self) -> dict:
        return {"discriminator": self.discriminator.state_dict(), "optimiser": self.optimiser.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimiser.load_state_dict(state["optimiser"])
