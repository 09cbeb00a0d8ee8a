"""What goes in: discovery of volumes (folders, globs, lists, BIDS), the manifest, input quality checks and
where each volume's brain mask comes from."""
