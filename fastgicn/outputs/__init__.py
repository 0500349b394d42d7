"""What a segmented slide leaves behind: pyramidal TIFFs (pushed rows, pooled tile encoding), the reduced
summary, polygons as GeoJSON, the overlay and the report, each written atomically."""
