(function(){
  var grid=document.getElementById('grid'),all=Array.prototype.slice.call(grid.children),shown=all,page=0;
  var per=parseInt(grid.getAttribute('data-per-page'),10),info=document.getElementById('pageinfo');
  function pages(){return Math.max(1,Math.ceil(shown.length/per));}
  function render(){
    page=Math.min(Math.max(page,0),pages()-1);
    all.forEach(function(c){c.style.display='none';});
    shown.slice(page*per,(page+1)*per).forEach(function(c){c.style.display='';});
    info.textContent='page '+(page+1)+' of '+pages()+' \u00b7 '+shown.length+' of '+all.length+' samples';
  }
  function apply(){
    var q=document.getElementById('filter').value.toLowerCase(),key=document.getElementById('sort').value;
    shown=all.filter(function(c){return c.getAttribute('data-search').indexOf(q)>=0;});
    if(key){var sign=key.charAt(0)==='-'?-1:1,name=key.replace(/^-/,'');
      shown.sort(function(a,b){
        var x=parseFloat(a.getAttribute('data-'+name)),y=parseFloat(b.getAttribute('data-'+name));
        if(isNaN(x))return 1;if(isNaN(y))return -1;return sign*(x-y);});}
    shown.forEach(function(c){grid.appendChild(c);});page=0;render();
  }
  document.getElementById('prev').onclick=function(){page--;render();};
  document.getElementById('next').onclick=function(){page++;render();};
  document.getElementById('filter').oninput=apply;document.getElementById('sort').onchange=apply;
  document.addEventListener('keydown',function(e){if(e.target.tagName==='INPUT')return;
    if(e.key==='ArrowRight'){page++;render();}if(e.key==='ArrowLeft'){page--;render();}});
  render();
})();
