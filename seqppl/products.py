"""The joint lattice of several parts: the product of their distinct lattices, tables lifted to it.

An EBM whose parts live on lattices ``L_0, L_1, ...`` (some of them the same object) has its
exact route on ``((L_0 × L_1) × L_2) × ...`` over the distinct ones; a table on ``L_i`` becomes a
table on that product by reading each product state's ``i``-th component (``Lattice.lift``).
"""

from __future__ import annotations

import jax

from seqppl.lattice import Lattice

__all__ = ["joint_lattice", "lift_to_joint"]


def joint_lattice(lattices) -> Lattice:
    """The product ``((L_0 × L_1) × L_2) × ...`` of the distinct lattices (by identity) of
    ``lattices``, in order of first appearance; a single lattice is its own joint lattice."""
    distinct = _distinct(lattices)
    joint = distinct[0]
    for lat in distinct[1:]:
        joint = joint.product(lat)
    return joint


def lift_to_joint(joint: Lattice, lattices, lat: Lattice, table) -> jax.Array:
    """A table ``[..., S_lat, A]`` on ``lat`` as a table on ``joint = joint_lattice(lattices)``."""
    distinct = _distinct(lattices)
    position = next(i for i, seen in enumerate(distinct) if seen is lat)
    chain = [joint]  # J_n, J_{n-1}, ..., J_0 = L_0
    while len(chain) < len(distinct):
        chain.append(chain[-1].factors[0])
    chain.reverse()
    out = table if position == 0 else chain[position].lift(table, 1)
    for product in chain[position + 1 :]:
        out = product.lift(out, 0)
    return out


def _distinct(lattices) -> list[Lattice]:
    out = []
    for lat in lattices:
        if all(lat is not seen for seen in out):
            out.append(lat)
    return out
