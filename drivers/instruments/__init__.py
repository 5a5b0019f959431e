"""Protocol clients, one module per instrument (see DESIGN.md: labd -> protocols -> drivers)."""
