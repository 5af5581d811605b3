"""HTTP: routes (thin handlers that call services), guards, portal cookies, templates and charts."""
