DROP TABLE cart_items;
DROP TABLE cart_products;
