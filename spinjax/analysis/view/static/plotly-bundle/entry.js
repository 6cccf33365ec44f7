// The page draws heatmaps and scatter lines only: plotly's core (which holds scatter) and heatmap.
var Plotly = require('plotly.js/lib/core');
Plotly.register([require('plotly.js/lib/heatmap')]);
module.exports = Plotly;
