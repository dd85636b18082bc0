"""A closed, consistently oriented triangle surface made manifold.

Where voxels of a label touch only along an edge or at a corner, surface nets give an edge of four
triangles and vertices where two sheets of the surface meet; 3D printing software calls such a mesh
non-manifold. :func:`manifold` pairs the triangles around each such edge (on the unsmoothed grid
points, where their order around the edge is never folded) and gives each vertex one copy per sheet
through it, each copy moved a twentieth of the way into its own sheet: the sheets then share no
vertex and no point, also in an STL file (which keeps no shared vertices: the software that reads it
joins corners at the same place), and nothing else moves.
"""

from __future__ import annotations

import numpy as np

SPLIT_STEP = 0.05  # how far the copies of a split vertex move toward their own triangles' centre


def used_points(triangles: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The points (of ``count``) that ``triangles`` use, as their indices in order, and the triangles
    indexing those: a surface's own points out of a shared mesh's (``np.unique`` with its inverse,
    without sorting)."""
    used = np.zeros(count, bool)
    used[triangles.ravel()] = True
    return np.flatnonzero(used), (np.cumsum(used) - 1)[triangles]


def _edge_keys(points: np.ndarray, triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each half-edge ``3 * face + k`` (corner k to corner k + 1): start vertex, end vertex, and a key
    shared by the half-edges of the same undirected edge."""
    start, end = triangles.ravel(), triangles[:, [1, 2, 0]].ravel()
    return start, end, np.minimum(start, end).astype(np.int64) * len(points) + np.maximum(start, end)


def _twins(points: np.ndarray, triangles: np.ndarray, flipped: set) -> tuple[np.ndarray, np.ndarray] | None:
    """For each half-edge of a closed, consistently oriented surface, the half-edge that runs the
    other way along the same edge on the same sheet: the only one where two triangles share the
    edge; where more do (voxels touching along an edge), the next one around the edge (its order
    taken from ``points``) toward the solid's inside, or toward its outside for the edges in
    ``flipped`` (any one where the triangles around the edge are folded out of order); and the
    half-edges of the edges of more than two triangles. None where the surface is not closed and
    consistently oriented."""
    start, end, key = _edge_keys(points, triangles)
    order = np.lexsort((start > end, key))
    sorted_keys = key[order]
    bounds = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1], True])
    del sorted_keys
    sizes = np.diff(bounds)
    twin = np.full(len(key), -1, triangles.dtype)
    pairs = order[bounds[:-1][sizes == 2]], order[bounds[:-1][sizes == 2] + 1]
    if (sizes % 2).any() or (start[pairs[0]] == start[pairs[1]]).any():
        return None
    twin[pairs[0]], twin[pairs[1]] = pairs[1], pairs[0]
    shared = []
    for begin, stop in zip(bounds[:-1][sizes > 2], bounds[1:][sizes > 2]):  # non-manifold edges: few
        around = order[begin:stop]
        shared.append(around)
        a, b = start[around[0]], end[around[0]]
        axis = (points[b] - points[a]) / max(np.linalg.norm(points[b] - points[a]), 1e-12)
        across = points[triangles.ravel()[3 * (around // 3) + (around % 3 + 2) % 3]] - points[a]
        across -= np.outer(across @ axis, axis)
        first = across[0] / max(np.linalg.norm(across[0]), 1e-12)
        angle = np.arctan2(across @ np.cross(axis, first), across @ first)
        ring = around[np.argsort(angle, kind="stable")]
        forward = start[ring] == a  # these face the solid on the side of smaller angles
        if forward.sum() * 2 != len(ring):
            return None
        partner = np.roll(ring, -1 if key[around[0]] in flipped else 1)[forward]
        if (forward == np.roll(forward, 1)).any():  # folded (by decimation): any pairing keeps the
            partner = ring[~forward]                 # surface closed and manifold
        twin[ring[forward]], twin[partner] = partner, ring[forward]
    return twin, np.concatenate(shared) if shared else np.zeros(0, np.int64)


def _sheets(twin: np.ndarray) -> np.ndarray:
    """The sheet of each corner ``3 * face + k``: corners of a vertex joined across twin half-edges,
    numbered in the order of their first corner. Crossing the edge that starts at a corner leads to
    the next corner around its vertex, and crossing back the other edge returns: the sheets are the
    cycles of that step, found by pointer jumping (each corner takes the smallest corner within 2,
    4, 8 ... steps ahead until nothing changes: then every cycle has been seen whole)."""
    corner = np.arange(len(twin), dtype=twin.dtype)
    # a half-edge's start corner is its twin's end corner
    ahead = 3 * (twin // 3) + (twin % 3 + 1) % 3
    smallest = corner.copy()
    while True:
        reached = np.minimum(smallest, smallest[ahead])
        ahead = ahead[ahead]
        if np.array_equal(reached, smallest):
            break
        smallest = reached
    first = smallest == corner
    return (np.cumsum(first, dtype=twin.dtype) - 1)[smallest]


def _opposite_pairs(triangles: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Of ``faces``, the triangles that pair up with another of the same corners wound the other
    way: a sheet of no thickness, which decimation leaves where a label is thinner than its
    triangles. Dropping both triangles of each pair takes one use each way from each of their
    edges, so the surface stays closed and consistently oriented."""
    faces = np.unique(faces)
    corners = triangles[faces]
    inversions = ((corners[:, 0] > corners[:, 1]).astype(int) + (corners[:, 0] > corners[:, 2])
                  + (corners[:, 1] > corners[:, 2]))
    forward = inversions % 2 == 0  # wound as its corners in increasing order
    _, group = np.unique(np.sort(corners, axis=1), axis=0, return_inverse=True)
    dropped = []
    for same in np.flatnonzero(np.bincount(group.ravel()) > 1):
        members = np.flatnonzero(group.ravel() == same)
        ways = members[forward[members]], members[~forward[members]]
        pairs = min(len(ways[0]), len(ways[1]))
        dropped += [*faces[ways[0][:pairs]], *faces[ways[1][:pairs]]]
    return np.array(dropped, np.int64)


def manifold(points: np.ndarray, unsmoothed: np.ndarray, triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The surface with a copy of each vertex for each sheet through it, so that no edge has more
    than two triangles and no vertex joins sheets that only touch there: sheets of no thickness
    (two triangles of the same corners wound opposite ways) are dropped, the others are separated
    as the solid's inside suggests (on the ``unsmoothed`` points, where triangles around an edge
    never fold), and at an edge where that leaves the sheets joined (the solid wraps around the
    edge's ends) the other way. Returns only the points its triangles use, and the triangles
    indexing them; nothing is split where the surface is already manifold, or not closed and
    consistently oriented."""
    flipped: set = set()
    _, _, key = _edge_keys(points, triangles)
    for attempt in range(4):
        twins = _twins(unsmoothed, triangles, flipped)
        if twins is None:
            used, own = used_points(triangles, len(points))
            return points[used], own
        twin, shared_edges = twins
        if attempt == 0 and len(shared_edges):
            folded = _opposite_pairs(triangles, shared_edges // 3)
            if len(folded):
                triangles = np.delete(triangles, folded, axis=0)
                _, _, key = _edge_keys(points, triangles)
                continue
        sheet = _sheets(twin)  # a sheet's corners are all of one vertex: each sheet is a copy of it
        if not len(shared_edges):
            break
        # only edges of more than two triangles before can still have more than two
        ends = np.stack([sheet[shared_edges], sheet[3 * (shared_edges // 3) + (shared_edges % 3 + 1) % 3]])
        _, edge, uses = np.unique(ends.min(axis=0).astype(np.int64) * len(sheet) + ends.max(axis=0), return_inverse=True,
                                  return_counts=True)
        still = uses[edge] > 2
        if not still.any():
            break
        flipped |= set(key[shared_edges[still]].tolist())
    vertex = np.empty(int(sheet.max()) + 1, np.int64)
    vertex[sheet] = triangles.ravel()
    own = sheet.reshape(-1, 3)
    return _apart(points[vertex], own, vertex), own


def _apart(points: np.ndarray, triangles: np.ndarray, vertex: np.ndarray) -> np.ndarray:
    """The copies of each split vertex moved ``SPLIT_STEP`` of the way toward the centre of their own
    triangles, so that the sheets no longer touch: an STL file keeps no shared vertices, and the
    software that reads it (3D printing slicers) joins corners at the same place into one vertex,
    which would join the sheets again."""
    split = np.bincount(vertex)[vertex] > 1
    if not split.any():
        return points
    corners = triangles.ravel()
    centres = np.repeat(points[triangles].mean(axis=1), 3, axis=0)  # of each corner's triangle
    uses = np.bincount(corners, minlength=len(points))
    around = np.stack([np.bincount(corners, centres[:, axis], len(points)) for axis in range(3)], axis=1)
    moved = points.copy()
    moved[split] += SPLIT_STEP * (around[split] / uses[split, None] - points[split])
    return moved
