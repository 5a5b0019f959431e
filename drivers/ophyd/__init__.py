"""ophyd-async devices and Signal backends over labd's serial, Modbus and MQTT transports."""
