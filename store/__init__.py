"""The credit store: products, orders, rewards, price rules, the /credit-store API and page."""
