"""Models: references to them (aliases, the catalog, Hub ids, folders), the Hub store, the folders'
layouts (diffusers', Apple's Core ML), and the models shipped in the package (tiny/, scenes/)."""
