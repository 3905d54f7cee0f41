DROP TABLE bus_test_effects;
