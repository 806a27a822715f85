"""What a person reads: the HTML pair viewer and the SVG plots of reports."""
