"""What a terminal shows: progress bars over the library's progress callbacks (the library itself never
prints).
"""
