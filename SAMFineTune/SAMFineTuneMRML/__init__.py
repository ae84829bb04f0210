"""MRML side of the SAMFineTune module: runs inside Slicer and under plain Python with slicer-core."""
