DROP TABLE colony_consumer_leases;
