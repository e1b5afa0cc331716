{#- Counts script errors and images that failed to decode into data attributes
    of <body>, so a headless browser's DOM dump shows whether the page is sound. -#}
(function () {
  var errors = 0;
  window.addEventListener('error', function () { errors += 1; document.body.dataset.errors = errors; }, true);
  function filter(value) {
    document.querySelectorAll('.filter button').forEach(function (b) {
      b.classList.toggle('active', b.dataset.iteration === value);
    });
    document.querySelectorAll('.pair').forEach(function (p) {
      p.classList.toggle('hidden', value !== 'all' && p.dataset.iteration !== value);
    });
  }
  document.addEventListener('DOMContentLoaded', function () {
    document.querySelectorAll('.filter button').forEach(function (b) {
      b.addEventListener('click', function () { filter(b.dataset.iteration); });
    });
  });
  window.addEventListener('load', function () {
    var broken = 0;
    document.querySelectorAll('img').forEach(function (img) {
      if (!img.complete || img.naturalWidth === 0) { broken += 1; }
    });
    document.body.dataset.brokenImages = broken;
    document.body.dataset.errors = errors;
    document.body.dataset.pairs = document.querySelectorAll('.pair').length;
    document.body.dataset.state = 'loaded';
  });
})();
