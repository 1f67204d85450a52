"""The Northwind kiosk: the demo application of the closed loop (work in progress)."""
