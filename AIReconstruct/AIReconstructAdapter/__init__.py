"""The Qt-free part of the Slicer adapter: MRML node conversion and the engine process.

Everything here uses only Slicer's MRML libraries (``import slicer`` gives them both inside the
Slicer application and from the ``slicer-core`` package), so it is tested outside Slicer on real
MRML nodes. The engine (``AIReconstructLib``) itself never imports Slicer.
"""
