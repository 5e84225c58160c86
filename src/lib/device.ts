// --device and --precision: the same two flags on every command that computes, declared once in the
// core (jobs::DeviceArgs), which checks them.
import {optionFlags} from './options.js'

export const deviceFlags = optionFlags('device', {device: {helpGroup: 'DEVICE'}, precision: {helpGroup: 'DEVICE'}})
