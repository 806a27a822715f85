"""What a person reads: the HTML pair viewer (tables and plots come with the reproduction)."""
