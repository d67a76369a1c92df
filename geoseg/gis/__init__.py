"""GIS steps on finished maps: sieving to a minimum mapping unit (and, after the move, vectorising, quicklooks)."""
